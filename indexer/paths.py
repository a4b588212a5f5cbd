"""Raw path bytes as text to show; no third-party imports, so planning and scanning stay light."""

from __future__ import annotations

import os
from pathlib import Path


def display_path(path: bytes | str | Path) -> str:
    """A printable form of any path, undecodable bytes shown as \\xNN."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")
