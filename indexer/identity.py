"""Which library a catalog and a library folder belong to (revision 0008).

A PostgreSQL catalog lives apart from its library folder, which other machines reach over a shared
filesystem, often at another mount path: the path cannot say whether a folder is the catalog's. A
random library id, recorded in the catalog and in `FOLDER/library-id` when the library is made, can.
The same id at another photo-folder path is the same library mounted elsewhere: it opens, the move
is logged, and writers record the new path. Another id is another library: refused, since its FAISS
files and journals would be checked against (and rebuilt from) the wrong catalog.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from .catalog_gateway import Catalog
from .errors import LibraryError, LibraryMismatchError

log = logging.getLogger(__name__)

ID_FILE = "library-id"
_ID = re.compile(r"[0-9a-f]{32}")


def folder_library_id(folder: Path) -> str | None:
    """The library id written in `folder` (None: none yet); LibraryError if the file is not one."""
    try:
        text = (folder / ID_FILE).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LibraryError(f"{folder / ID_FILE} cannot be read: {e.strerror or e}") from e
    if not _ID.fullmatch(text):
        raise LibraryError(f"{folder / ID_FILE} does not hold a library id (32 hex digits); remove it, and the next "
                           f"writer writes the catalog's id there again")
    return text


def write_library_id(folder: Path, library_id: str) -> None:
    """Write `folder`/library-id atomically (a reader never sees half an id)."""
    temp = folder / f".{ID_FILE}.{os.getpid()}.tmp"
    with open(temp, "w", encoding="ascii") as f:
        f.write(library_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, folder / ID_FILE)


SAMPLE_FILES = 50  # catalogued files looked for when a folder without a library id claims a catalog
MTIME_SLACK_NS = 2_000_000_000  # network and FAT mounts show times rounded (FAT: to 2 s)


def shows_catalogued_files(catalog: Catalog, root: Path) -> bool:
    """Whether `root` is the photo folder the catalog describes, mounted at another path: one of its
    first catalogued files is there with the same size and modification time, give or take a mount's
    rounding (a copy made without keeping times, or another folder, has none). True for a catalog
    with no embedded file: there is nothing to lose."""
    sample = catalog.sample_files(SAMPLE_FILES)
    for path, size, mtime_ns in sample:
        try:
            info = os.stat(os.path.join(os.fsencode(str(root)), path))  # as the scan sees it
        except OSError:
            continue
        if info.st_size == size and abs(info.st_mtime_ns - mtime_ns) <= MTIME_SLACK_NS:
            return True
    return not sample


def check_identity(catalog: Catalog, folder: Path, root: Path, *, may_write: bool, where: str,
                   catalog_in_folder: bool = False) -> str | None:
    """Check that the library folder and the catalog belong to one library, and return its id.

    `may_write` (writers and creating opens) gives a catalog without an id a new one, writes the
    catalog's id into a folder that has none (a new library folder, or one made before revision 0008)
    and records `root` when the library is opened from another path. Readers only check and log.
    `where` names the catalog in messages. LibraryMismatchError where the ids differ.
    """
    in_folder = folder_library_id(folder)
    recorded = catalog.library_identity()
    root_bytes = os.fsencode(str(root))
    if recorded is None:
        if in_folder is not None and catalog_in_folder:
            # The folder's own SQLite catalog, from before revision 0008 (restored from its migration
            # backup, or downgraded): one library whatever it records. It learns the folder's id.
            if may_write:
                catalog.record_library(in_folder, root_bytes)
            return in_folder
        if in_folder is not None:
            # A folder made for another catalog (or whose catalog was lost) with a new, empty one.
            raise LibraryMismatchError(
                f"{folder} belongs to library {in_folder}, but the catalog {where} records no library (a new or "
                f"another database?); give that library's catalog, or another library folder for a new library")
        if not may_write:
            return None  # a catalog no writer opened since revision 0008: the next writer records it
        library_id = uuid.uuid4().hex
        catalog.record_library(library_id, root_bytes)
        write_library_id(folder, library_id)
        log.info("library %s recorded in %s and %s (photos at %s)", library_id, where, folder / ID_FILE, root)
        return library_id
    library_id, last_root = recorded
    if in_folder is not None and in_folder != library_id:
        raise LibraryMismatchError(
            f"{folder} belongs to library {in_folder}, but the catalog {where} to library {library_id} (last used "
            f"with photos at {os.fsdecode(last_root)}); give the library folder of that catalog, or the catalog "
            f"of this folder")
    if in_folder is None and may_write:
        if last_root != root_bytes and not catalog_in_folder and not shows_catalogued_files(catalog, root):
            # Another photo folder with this catalog's URL: adopting it would re-embed its files into
            # this library's catalog and then try to sweep the rows of the real one.
            raise LibraryMismatchError(
                f"the catalog {where} belongs to library {library_id}, last used with photos at "
                f"{os.fsdecode(last_root)}, and {root} holds none of its catalogued files as they were (name, size, "
                f"time), nor does {folder} hold a library id: a new library needs its own catalog (another database); "
                f"for that library's photos mounted here, give its library folder as mounted here")
        write_library_id(folder, library_id)
        log.warning("library folder %s had no library id: it is now library %s's (last used with photos at %s)",
                    folder, library_id, os.fsdecode(last_root))
    if last_root != root_bytes:
        log.info("library %s opened from %s (last used from %s)%s", library_id, root, os.fsdecode(last_root),
                 ": recorded" if may_write else "")
        if may_write:
            catalog.record_root(root_bytes)
    return library_id
