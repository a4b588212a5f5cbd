"""Paths: raw bytes as text to show, user-given paths under a root; no third-party imports, so
planning and scanning stay light."""

from __future__ import annotations

import os
from pathlib import Path


def display_path(path: bytes | str | Path) -> str:
    """A printable form of any path, undecodable bytes shown as \\xNN."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def under_root(root: Path, path: bytes | str | os.PathLike) -> Path:
    """A path the user typed, made absolute: a relative one is read from the current folder when
    that names something inside `root` (what a shell's tab completion gives), else from `root`
    (photo paths as the library lists them)."""
    given = Path(os.fsdecode(path)).expanduser()
    if given.is_absolute():
        return given
    here = Path.cwd() / given
    if os.path.lexists(here) and here.resolve().is_relative_to(root.resolve()):
        return here
    return root / given
