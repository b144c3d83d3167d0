"""Every test process and the services it starts share one token, as a stack shares its data root's."""

import os
import secrets
import tempfile

# Set before any test imports a service: servers check it, clients send it.
os.environ.setdefault("STEMLAB_TOKEN", "test-" + secrets.token_urlsafe(24))
# Tests import from folders they make under the temporary directory (pytest's tmp_path): the
# services may read there, as an operator's STEMLAB_IMPORT_ROOTS lets them read a music folder.
os.environ.setdefault("STEMLAB_IMPORT_ROOTS", tempfile.gettempdir())


def pytest_terminal_summary(terminalreporter):
    """The hostile-input suite's count: how many attacks were tried (each test asserts its refusal)."""
    import sys

    hostile = sys.modules.get("tests.test_hostile")
    if hostile is not None and hostile.TRIED:
        terminalreporter.write_line(f"hostile inputs tried: {len(hostile.TRIED)} "
                                    f"(each refused with a clear error; see tests/test_hostile.py)")
