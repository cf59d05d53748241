"""Limits shared by the engine, the CLI and the web app (imports nothing heavy)."""

MAX_OBJECT_ID = 255  # the label map is uint8: object ids 1..255
