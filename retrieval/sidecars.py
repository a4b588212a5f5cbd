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

A folder is listed once per command (FolderIndex), not once per photo in it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

from dinoseek.indexer.scan import IMAGE_EXTENSIONS

# RAW formats from cameras in use; compared lower-case. Kept here (not in indexer.scan) because what
# matters is "the negative behind this JPEG", not whether we can decode it (we cannot).
RAW_SUFFIXES = frozenset(
    {".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".raf", ".orf", ".rw2",
     ".pef", ".srw", ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".mos", ".mrw", ".rwl", ".raw"}
)
# Photos a camera or phone writes *beside* a RAW or a Live Photo video: the rendered half of a pair.
PAIRED_PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".heic", ".heif"})
LIVE_PHOTO_SUFFIXES = frozenset({".mov"})
# Suffixes of images the indexer decodes: never sidecars. Derived from the scanner's own set, so the
# two cannot drift apart.
INDEXED_IMAGE_SUFFIXES = frozenset(os.fsdecode(ext) for ext in IMAGE_EXTENSIONS)


def _split(name: str) -> tuple[str, str]:
    """``IMG_1.JPG`` -> (``IMG_1``, ``.jpg``); a name without a dot has an empty suffix."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, "." + ext.lower()


def _key(name: str) -> str:
    """What a folder's names are grouped by: the part before the first dot, lower-cased. Every
    sidecar name of a photo (``IMG_1.xmp``, ``IMG_1.JPG.xmp``, ``IMG_1.CR2.xmp``) starts with the
    photo's stem, so its candidates are the names under the stem's key (and its Apple original's)."""
    return name.split(".", 1)[0].lower()


class FolderIndex:
    """Each folder listed once, its regular files (not symlinks) grouped by `_key`.

    Finding sidecars lists the photo's folder; a phone dump holds 10,000 files in one folder and a
    dedup plan has members by the thousand there, so one listing per folder per command, not one per
    member. Made at the start of a command (`one_listing_per_folder`) or by the caller and passed in;
    `moved` keeps it true while an apply takes names out of a folder."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, list[str]]] = {}

    def near(self, photo: Path) -> list[str]:
        """Sorted names of regular files in photo's folder that may be its sidecars or same-stem photos."""
        by_key = self._listing(photo.parent)
        stem, _ = _split(photo.name)
        keys = {_key(stem)}
        original = _apple_original_stem(stem)
        if original is not None:
            keys.add(_key(original))
        return sorted(name for key in keys for name in by_key.get(key, ()))

    def moved(self, path: Path) -> None:
        """`path` left its folder (apply moved it): the listing no longer shows it."""
        by_key = self._folders.get(path.parent)
        if by_key is not None:
            with contextlib.suppress(ValueError, KeyError):
                by_key[_key(path.name)].remove(path.name)

    def _listing(self, folder: Path) -> dict[str, list[str]]:
        by_key = self._folders.get(folder)
        if by_key is None:
            by_key = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if _is_regular(entry):
                            by_key.setdefault(_key(entry.name), []).append(entry.name)
            except OSError:
                pass  # cannot be listed: no sidecars found there
            self._folders[folder] = by_key
        return by_key


_current: contextvars.ContextVar[FolderIndex | None] = contextvars.ContextVar("folder_index", default=None)


@contextlib.contextmanager
def one_listing_per_folder() -> Iterator[FolderIndex]:
    """For one command: `raw_partner`, `sidecars_of` and what calls them without an index of their
    own (dedup's keep rules, the plan summary, apply) share one FolderIndex, so each folder is listed
    once. Ends with the block: a later command sees the folders as they are then."""
    index = FolderIndex()
    token = _current.set(index)
    try:
        yield index
    finally:
        _current.reset(token)


def folder_index() -> FolderIndex:
    """The command's FolderIndex (see one_listing_per_folder), or a new one to share between calls."""
    return _current.get() or FolderIndex()


def _is_regular(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)  # from the directory entry's type: no stat on Linux
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


def raw_partner(photo: Path, index: FolderIndex | None = None) -> Path | None:
    """The RAW file with this JPEG/HEIC's stem in the same folder (any suffix case), or None.

    Only a JPEG or HEIC/HEIF has a RAW partner (a camera's RAW+JPEG pair); for any other photo, or
    when no such regular file exists, the answer is None. The folder is read through `index` (by
    default the command's, see one_listing_per_folder).
    """
    photo = Path(photo)
    return _raw_partner_in(photo, (index or folder_index()).near(photo))


def raw_files(photo: Path, index: FolderIndex | None = None) -> list[Path]:
    """Every RAW file with this JPEG/HEIC's stem beside it (``IMG_1.CR2`` and ``IMG_1.DNG``), sorted."""
    photo = Path(photo)
    stem, suffix = _split(photo.name)
    if suffix not in PAIRED_PHOTO_SUFFIXES:
        return []
    return [photo.parent / name for name in (index or folder_index()).near(photo)
            if _split(name)[0] == stem and _split(name)[1] in RAW_SUFFIXES]


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


def sidecars_of(photo: Path, index: FolderIndex | None = None) -> list[Path]:
    """Every file that should move and be restored together with ``photo``, sorted.

    Never includes ``photo`` itself, another indexed image, or a sidecar shared with another
    same-stem photo (see the module docstring). The folder is read through `index` (by default the
    command's, see one_listing_per_folder).
    """
    photo = Path(photo)
    names = (index or folder_index()).near(photo)
    stem, _ = _split(photo.name)
    shared = _is_shared_stem(photo, names)
    partner = _raw_partner_in(photo, names)
    found = []
    for name in names:
        if not is_sidecar_name(photo.name, name):
            continue
        if shared and _split(name)[0] != photo.name:  # only IMG_1.JPG.xmp names its photo in full
            continue
        n_stem, n_suffix = _split(name)
        if n_suffix in RAW_SUFFIXES and photo.parent / name != partner:
            continue  # a second RAW beside the JPEG (.CR2 and .DNG): only the partner goes
        if _raw_xmp_of(stem, n_stem) and photo.parent / n_stem != partner:
            continue
        found.append(photo.parent / name)
    return found


def _apple_original_stem(stem: str) -> str | None:
    """``IMG_1234`` -> ``IMG_O1234``: where iOS 13+ keeps the edit recipe of an edited photo."""
    prefix, sep, number = stem.partition("_")
    if not sep or not number or number.startswith(("E", "O")):
        return None
    return f"{prefix}_O{number}"


def renamed(sidecar_name: str, photo_name: str, new_photo_name: str) -> str:
    """The name a sidecar takes when its photo is renamed, so that it still pairs with it by name:
    ``IMG_1.xmp`` -> ``IMG_1~1.xmp`` when ``IMG_1.JPG`` becomes ``IMG_1~1.JPG`` (``IMG_1.JPG.xmp`` ->
    ``IMG_1~1.JPG.xmp``, ``IMG_O1.AAE`` -> ``IMG_O1~1.AAE``)."""
    if new_photo_name == photo_name:
        return sidecar_name
    stem, new_stem = _split(photo_name)[0], _split(new_photo_name)[0]
    original, new_original = _apple_original_stem(stem), _apple_original_stem(new_stem)
    if original is not None and new_original is not None and sidecar_name.startswith(original + "."):
        return new_original + sidecar_name[len(original):]
    if sidecar_name.startswith(stem + "."):
        return new_stem + sidecar_name[len(stem):]
    return sidecar_name  # not named after its photo (never found by sidecars_of): keeps its name
