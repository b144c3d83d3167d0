"""The Flask web demo: separate a song with a served model, listen, mix, download; review stems."""
