"""Files that belong to a photo and travel with it: XMP/AAE sidecars, a same-stem RAW, a Live Photo's MOV.

Naming conventions recognised (letter case of the suffix never matters; the stem must match exactly,
as cameras and phones write it):

- ``IMG_1.xmp`` (Lightroom, Capture One, digiKam) and ``IMG_1.JPG.xmp`` (darktable);
- ``IMG_1.AAE`` and, for newer iOS exports, ``IMG_O1.AAE`` (the edit recipe of ``IMG_1``);
- ``IMG_1.MOV`` beside ``IMG_1.HEIC`` / ``IMG_1.JPG`` (the motion half of a Live Photo);
- a RAW file (``IMG_1.CR2``, ``.dng``, ``.NEF``, ...) beside a JPEG/HEIC, plus that RAW's own
  darktable sidecar ``IMG_1.CR2.xmp``.

Why some same-stem files are not sidecars:

- a file whose suffix is an image we index (``IMG_1.png``, ``IMG_E1.JPG``) is a photo in its own
  right, with its own row and its own dedup fate;
- a stem-level sidecar (``IMG_1.xmp``, ``IMG_1.AAE``, ``IMG_1.MOV``, the RAW) is *shared* when another
  indexed image in the same folder has the same stem (``IMG_1.JPG`` + ``IMG_1.HEIC``); moving it with
  one of them would strip it from the other, so it stays where it is. ``IMG_1.JPG.xmp`` names its photo
  in full and is never shared.

Only regular files count: a symlink, FIFO or folder with a sidecar's name is left alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# RAW formats from cameras in use; compared lower-case. Kept here (not in indexer.scan) because what
# matters is "the negative behind this JPEG", not whether we can decode it (we cannot).
RAW_SUFFIXES = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
     ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".mos", ".mrw", ".rwl", ".raw"}
)
# Photos a camera or phone writes *beside* a RAW or a Live Photo video: the rendered half of a pair.
PAIRED_PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".heic", ".heif"})
METADATA_SUFFIXES = frozenset({".xmp", ".aae"})
LIVE_PHOTO_SUFFIXES = frozenset({".mov"})
# Suffixes of images the indexer decodes (indexer.scan.IMAGE_EXTENSIONS, as text): never sidecars.
INDEXED_IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif"}
)


def _split(name: str) -> tuple[str, str]:
    """``IMG_1.JPG`` -> (``IMG_1``, ``.jpg``); a name without a dot has an empty suffix."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext.lower()


def _regular_files(folder: Path) -> list[str]:
    """Names of the regular files (not symlinks) in ``folder``; empty when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if _is_regular(e))
    except OSError:
        return []


def _is_regular(entry: os.DirEntry) -> bool:
    try:
        return stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode)
    except OSError:
        return False


def _is_shared_stem(photo: Path, names: list[str]) -> bool:
    """Another indexed image in the folder has this photo's stem, so stem-level sidecars are shared."""
    stem, _ = _split(photo.name)
    for name in names:
        n_stem, n_suffix = _split(name)
        if name != photo.name and n_stem == stem and n_suffix in INDEXED_IMAGE_SUFFIXES:
            return True
    return False


def _raw_partner_in(photo: Path, names: list[str]) -> Path | None:
    stem, suffix = _split(photo.name)
    if suffix not in PAIRED_PHOTO_SUFFIXES:
        return None
    for name in names:  # sorted, so the choice is stable when a folder holds both .CR2 and .DNG
        n_stem, n_suffix = _split(name)
        if n_stem == stem and n_suffix in RAW_SUFFIXES:
            return photo.parent / name
    return None


def raw_partner(photo: Path) -> Path | None:
    """The RAW file with this JPEG/HEIC's stem in the same folder (any suffix case), or None.

    Only a JPEG or HEIC/HEIF has a RAW partner (a camera's RAW+JPEG pair); for any other photo, or
    when no such regular file exists, the answer is None.
    """
    photo = Path(photo)
    return _raw_partner_in(photo, _regular_files(photo.parent))


def is_sidecar_name(photo_name: str, name: str) -> bool:
    """Could a file called `name` be a sidecar of a photo called `photo_name` in the same folder, by
    name alone? (Undo uses it to refuse a journal whose "sidecar" is some other file.)"""
    stem, suffix = _split(photo_name)
    n_stem, n_suffix = _split(name)
    if name == photo_name or n_suffix in INDEXED_IMAGE_SUFFIXES:
        return False
    if n_suffix == ".xmp" and (n_stem in (photo_name, stem) or _raw_xmp_of(stem, n_stem)):
        return True
    if n_suffix == ".aae":
        return n_stem in (stem, _apple_original_stem(stem))
    if suffix in PAIRED_PHOTO_SUFFIXES and n_stem == stem:
        return n_suffix in LIVE_PHOTO_SUFFIXES or n_suffix in RAW_SUFFIXES
    return False


def _raw_xmp_of(stem: str, n_stem: str) -> bool:
    """``IMG_1.CR2.xmp``: darktable's sidecar of the RAW partner ``IMG_1.CR2``."""
    raw_stem, raw_suffix = _split(n_stem)
    return raw_stem == stem and raw_suffix in RAW_SUFFIXES


def sidecars_of(photo: Path) -> list[Path]:
    """Every file that should move and be restored together with ``photo``, sorted.

    Never includes ``photo`` itself, another indexed image, or a sidecar shared with another
    same-stem photo (see the module docstring).
    """
    photo = Path(photo)
    names = _regular_files(photo.parent)
    stem, _ = _split(photo.name)
    shared = _is_shared_stem(photo, names)
    found = []
    for name in names:
        if not is_sidecar_name(photo.name, name):
            continue
        if shared and _split(name)[0] != photo.name:  # only IMG_1.JPG.xmp names its photo in full
            continue
        n_stem, n_suffix = _split(name)
        if n_suffix in RAW_SUFFIXES and photo.parent / name != _raw_partner_in(photo, names):
            continue  # a second RAW beside the JPEG (.CR2 and .DNG): only the partner goes
        if _raw_xmp_of(stem, n_stem) and photo.parent / n_stem != _raw_partner_in(photo, names):
            continue
        found.append(photo.parent / name)
    return found


def _apple_original_stem(stem: str) -> str | None:
    """``IMG_1234`` -> ``IMG_O1234``: where iOS 13+ keeps the edit recipe of an edited photo."""
    prefix, sep, number = stem.partition("_")
    if not sep or not number or number.startswith(("E", "O")):
        return None
    return f"{prefix}_O{number}"
