"""``python -m services.serving`` runs the compatible model server (same flags as server.py)."""

import sys

from services.serving.server import main

sys.exit(main())
