"""What the catalog records after dedup, hand edits, damage and read-only mounts (issue "Hardening").

1. links dedup leaves never displace the kept photo; 2. files put back by hand are embedded again;
3. the library folder is never indexed; 4. damaged or lost catalogs are refused, verify finds
damaged vectors, --repair re-embeds them; 5. --protect keeps every protected copy, raw bytes;
6. --in-folder takes the same spellings as --protect; 7. read-only library folders.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo, url_args
from sqlalchemy import update

from dinoseek.indexer.catalog import EMBEDDED, QUARANTINED, ImageRow
from dinoseek.indexer.errors import LibraryError, NeedsRepairError
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, run_index
from dinoseek.model import Encoder
from dinoseek.retrieval.actions import apply, undo
from dinoseek.retrieval.api import LibrarySearch
from dinoseek.retrieval.cli import main
from dinoseek.retrieval.dedup import find_duplicates

THRESHOLD = 0.98  # as in test_retrieval: a half-size copy is above it, distinct photos below


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


def index(root, encoder, folder=None, url=None, **options):
    options.setdefault("workers", 0)
    with Library.open(root, folder=folder, url=url, write=True, create=True) as library:
        return run_index(library, encoder, Options(**options))


def rows(root, folder=None, url=None) -> dict[bytes, ImageRow]:
    with Library.open(root, folder=folder, url=url) as library, library.catalog.session() as s:
        return {r.path: r for r in s.query(ImageRow).all()}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=92)


def photos_with_copies(root, copies: dict[str, str]):
    """Three distinct photos under m/, plus `copies`: {path: "photo" | "small" | "other"}."""
    photo = synthetic_photo(640, 480, seed=1)
    for i in range(3):
        save(root / f"m/other{i}.jpg", synthetic_photo(200, 150, seed=10 + i))
    for rel, kind in copies.items():
        image = {"photo": photo, "small": photo.resize((320, 240)), "other": synthetic_photo(640, 480, seed=5)}[kind]
        save(root / rel, image)
    return root


# ---- 1. a link made by dedup never displaces the kept photo ---------------------------------------------------
@pytest.mark.parametrize("action", ["hardlink", "symlink"])
@pytest.mark.parametrize("keeper,copy", [("a/big.jpg", "z/small.jpg"), ("z/big.jpg", "a/small.jpg")],
                         ids=["keeper-sorts-first", "link-sorts-first"])
def test_a_link_left_by_dedup_never_displaces_the_kept_photo(tmp_path, encoder, action, keeper, copy, catalog_url):
    root = photos_with_copies(tmp_path / "photos", {keeper: "photo", copy: "small"})
    follow = action == "symlink"  # a symlink is only ever seen with --follow-symlinks
    index(root, encoder, url=catalog_url, follow_symlinks=follow)
    kept_id = rows(root, url=catalog_url)[keeper.encode()].id
    with Library.open(root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, threshold=THRESHOLD)
        assert [g.keeper.path for g in groups] == [keeper]
        result = apply(library, groups, action)
        assert [s.src.name for s in result.done] == [os.path.basename(copy)]

    index(root, encoder, url=catalog_url, follow_symlinks=follow)
    after = rows(root, url=catalog_url)
    assert after[keeper.encode()].status == EMBEDDED and after[keeper.encode()].id == kept_id
    assert after[copy.encode()].status == QUARANTINED  # the link at the old path: set aside, as dedup left it
    with Library.open(root, url=catalog_url) as library, LibrarySearch(library) as lib:
        _, vector = lib.row_vector(keeper, "cls")
        assert lib.search(vector, k=1)[0].path == keeper
        assert find_duplicates(lib.library, threshold=THRESHOLD) == []  # nothing new proposed
        assert lib.library.verify() == []

    with Library.open(root, url=catalog_url, write=True) as library:  # and undo still brings the copy back whole
        assert len(undo(library).restored) == 1
    index(root, encoder, url=catalog_url, follow_symlinks=follow)
    assert rows(root, url=catalog_url)[copy.encode()].status == EMBEDDED
    with Library.open(root, url=catalog_url) as library:
        assert [g.keeper.path for g in find_duplicates(library, threshold=THRESHOLD)] == [keeper]


# ---- 2. a quarantined file put back by hand -----------------------------------------------------------------------
@pytest.mark.parametrize("action", ["move", "hardlink"])
@pytest.mark.parametrize("content", ["same", "edited"])
def test_a_quarantined_file_put_back_by_hand_is_checked_again(tmp_path, encoder, action, content, catalog_url):
    root = photos_with_copies(tmp_path / "photos", {"a/p.jpg": "photo", "b/p-copy.jpg": "photo"})
    index(root, encoder, url=catalog_url)
    copy_id = rows(root, url=catalog_url)[b"b/p-copy.jpg"].id
    with Library.open(root, url=catalog_url, write=True) as library:
        step = apply(library, find_duplicates(library, exact_only=True), action).done[0]
    if action == "hardlink":
        os.unlink(step.src)  # the user removes the link dedup left ...
    os.rename(step.dst, step.src)  # ... and moves the copy back by hand: same size, same mtime
    if content == "edited":  # or puts another picture there, keeping size and mtime
        stat = os.stat(step.src)
        data = bytearray(step.src.read_bytes())
        data[-100] ^= 0xFF  # inside the JPEG's entropy-coded data: still decodes, other bytes
        step.src.write_bytes(bytes(data))
        os.utime(step.src, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    counts = index(root, encoder, url=catalog_url)
    row = rows(root, url=catalog_url)[b"b/p-copy.jpg"]
    assert row.status == EMBEDDED
    if content == "same":  # the same bytes: its row and vectors come back, nothing is decoded for pixels
        assert counts["restored"] == 1 and counts["embedded"] == 0 and row.id == copy_id
    else:  # other bytes: embedded afresh
        assert counts["restored"] == 0 and counts["embedded"] == 1 and row.id != copy_id
    with Library.open(root, url=catalog_url) as library:
        assert library.verify() == []
        assert copy_id in library.catalog.embedded_ids() or content == "edited"
    assert index(root, encoder, url=catalog_url)["to_decode"] == 0  # and it is settled: not re-read on every run


# ---- 3. the library's own folder is never indexed -----------------------------------------------------------------
def test_a_library_folder_inside_the_photo_folder_is_never_indexed(tmp_path, tiny_folder, catalog_url):
    root = photos_with_copies(tmp_path / "photos", {"a/p.jpg": "photo", "b/p-copy.jpg": "photo"})
    library = root / "sub"
    url = url_args(catalog_url)
    index_args = ("index", root, "--library", library, *url, "--weights", tiny_folder, "--precision", "fp32",
                  "--workers", 0)
    assert invoke(*index_args).exit_code == 0
    result = invoke("dedup", root, "--library", library, *url, "--exact", "--action", "move", "--apply")
    assert result.exit_code == 0 and (library / "quarantine/b/p-copy.jpg").exists()
    result = invoke(*index_args)
    assert result.exit_code == 0, result.output
    assert not [p for p in rows(root, library, catalog_url) if p.startswith(b"sub")]
    result = invoke("dedup", root, "--library", library, *url, "--exact")
    assert result.output.endswith("0 groups, 0 files duplicated\n")


def test_the_photo_folder_itself_is_refused_as_library(tmp_path, tiny_folder, encoder, catalog_url):
    root = photos_with_copies(tmp_path / "photos", {"a/p.jpg": "photo"})
    result = invoke("index", root, "--library", root, *url_args(catalog_url), "--weights", tiny_folder, "--workers", 0)
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert result.output.startswith(f"Error: the library folder {root} is the photo folder itself")
    assert not (root / "catalog.sqlite").exists()  # refused before anything was made
    with pytest.raises(LibraryError, match="is the photo folder itself"):
        Library.open(root / "a" / "..", folder=root, url=catalog_url, write=True, create=True)


# ---- 4. damaged, lost and odd catalogs ----------------------------------------------------------------------------
# The tests of a damaged, lost, foreign or unreadable catalog *file* (and section 7's read-only folder,
# WAL and SQLite's own locks) are about the SQLite file in the library folder: they use `indexed`, on
# SQLite only. What holds for any catalog uses `indexed_on`, on both backends.
def _indexed(tmp_path, encoder, url):
    root = photos_with_copies(tmp_path / "photos", {"a/p.jpg": "photo", "b/p-small.jpg": "small"})
    index(root, encoder, url=url)
    return root


@pytest.fixture
def indexed(tmp_path, encoder):
    """An indexed library with its SQLite catalog (for the tests about the catalog file)."""
    return _indexed(tmp_path, encoder, None)


@pytest.fixture
def indexed_on(tmp_path, encoder, catalog_url):
    """An indexed library with its catalog on the backend under test (`catalog_url`)."""
    return _indexed(tmp_path, encoder, catalog_url)


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert len(result.output.splitlines()) == 1 and result.output.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_an_empty_or_lost_catalog_is_refused_not_replaced(indexed, tiny_folder):
    catalog = indexed / ".dinoseek/catalog.sqlite"
    catalog.write_bytes(b"")  # e.g. truncated by a full disk
    args = ("index", indexed, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    one_line_error(invoke(*args), "catalog.sqlite is missing or empty", ".faiss", "no backup exists",
                   "to start a new library")
    one_line_error(invoke("info", indexed), "catalog.sqlite is missing or empty")
    assert catalog.stat().st_size == 0  # nothing was started afresh
    catalog.unlink()
    one_line_error(invoke(*args), "catalog.sqlite is missing or empty")


def test_a_damaged_catalog_names_its_backup_and_restoring_it_works(indexed, tiny_folder):
    folder = indexed / ".dinoseek"
    backup = folder / "catalog.sqlite.bak-0002"  # what migrate.upgrade writes before a migration
    shutil.copy(folder / "catalog.sqlite", backup)
    (folder / "catalog.sqlite").write_bytes(os.urandom(8192))
    args = ("index", indexed, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0)
    one_line_error(invoke(*args), "catalog.sqlite is not a dinoseek catalog (damaged? file is not a database)", f"copy {backup} to")
    shutil.copy(backup, folder / "catalog.sqlite")  # the restore the message describes
    assert invoke(*args).exit_code == 0
    assert invoke("verify", indexed).exit_code == 0


def test_another_sqlite_database_is_not_taken_for_a_catalog(indexed):
    catalog = indexed / ".dinoseek/catalog.sqlite"
    catalog.unlink()
    with contextlib.closing(sqlite3.connect(catalog)) as db:
        db.execute("CREATE TABLE notes (text)")
    one_line_error(invoke("info", indexed), "is an SQLite database but not a dinoseek catalog")


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-device", "folder"])
def test_a_catalog_that_is_not_a_regular_file_is_refused_at_once(indexed, kind):
    catalog = indexed / ".dinoseek/catalog.sqlite"
    catalog.unlink()
    {"fifo": os.mkfifo, "symlink-to-device": lambda p: os.symlink("/dev/zero", p), "folder": os.mkdir}[kind](catalog)
    outcome = []

    def open_it():
        try:
            Library.open(indexed).close()
        except LibraryError as e:
            outcome.append(str(e))

    opener = threading.Thread(target=open_it, daemon=True)  # a hang stays in this thread, not the suite
    opener.start()
    opener.join(20)
    assert not opener.is_alive(), "opening the catalog blocked"
    assert outcome and "catalog.sqlite" in outcome[0] and ("not a regular file" in outcome[0] or "folder" in outcome[0])


def _damage_a_page(catalog, table: str) -> None:
    """Make the root page of `table` an invalid b-tree page (what a bad sector or torn write does)."""
    with contextlib.closing(sqlite3.connect(catalog)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root_page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    with open(catalog, "r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(b"\x07")  # not a b-tree page type


def test_writers_refuse_a_catalog_that_fails_sqlite_checks(indexed, tiny_folder):
    catalog = indexed / ".dinoseek/catalog.sqlite"
    _damage_a_page(catalog, "runs")
    before = catalog.read_bytes()
    with pytest.raises(LibraryError, match="catalog.sqlite is damaged"):
        Library.open(indexed, write=True)
    one_line_error(invoke("index", indexed, "--weights", tiny_folder, "--precision", "fp32", "--workers", 0),
                   "catalog.sqlite is damaged")
    result = invoke("verify", indexed)
    assert result.exit_code == 1 and "catalog: SQLite integrity check failed" in result.output
    assert "the catalog file itself is damaged" in result.output
    assert catalog.read_bytes() == before  # nobody wrote into the malformed file


def _vectors(folder) -> dict[int, tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{folder / 'catalog.sqlite'}?mode=ro", uri=True)) as db:
        return {i: tuple(np.frombuffer(v, np.float16).astype(np.float32).tobytes() for v in vs)
                for i, *vs in db.execute("SELECT id, cls, patch FROM images WHERE status = 'embedded'")}


def test_single_byte_flips_in_stored_vectors_are_found_by_verify(indexed, tmp_path):
    """25 random single-byte flips (each on a fresh copy) inside the vectors' bytes in the catalog
    file. Each must be reported by verify, or leave every vector numerically equal (e.g. a sign flip
    of an exact zero). Measured: all 25 reported — by the norm check (most exponent flips), the
    finiteness check (exponent to all ones), or for the rest (mantissa and sign flips keep the norm
    within 1e-2) by comparison with the exact index; 1000 of 1000 over 40 seeds.

    Flips anywhere in the file (measured, 1000 over 40 seeds, not asserted here): 671 changed no
    table content (free or unused bytes), 294 were reported by verify, 33 refused on open (header,
    schema, manifest checksum), 2 changed a value nothing can check without per-row checksums (an
    mtime, re-read by the next index run; an image height)."""
    folder = indexed / ".dinoseek"
    pristine = (folder / "catalog.sqlite").read_bytes()
    original = _vectors(folder)
    with Library.open(indexed) as library, library.catalog.session() as s:
        blobs = [b for r in s.query(ImageRow).filter(ImageRow.status == EMBEDDED) for b in (r.cls, r.patch)]
    offsets = [pristine.find(b) for b in blobs]
    assert all(o >= 0 for o in offsets)  # small blobs are stored inline, contiguous
    rng = random.Random(1)
    reported = 0
    for trial in range(25):
        copy = tmp_path / f"flip{trial}"
        shutil.copytree(folder, copy)
        data = bytearray(pristine)
        blob = rng.randrange(len(blobs))
        data[offsets[blob] + rng.randrange(len(blobs[blob]))] ^= rng.randrange(1, 256)
        (copy / "catalog.sqlite").write_bytes(bytes(data))
        with Library.open(indexed, folder=copy) as library:
            problems = library.verify()
        if problems:
            reported += 1
        else:
            assert _vectors(copy) == original, f"flip {trial} went unnoticed"
    assert reported == 25  # measured with this seed; any flip left unreported must at least be harmless


def test_rows_without_vectors_are_skipped_by_readers_and_repaired(indexed_on, encoder, catalog_url):
    indexed, url = indexed_on, url_args(catalog_url)
    with Library.open(indexed, url=catalog_url, write=True) as library, library.catalog.session() as s, s.begin():
        damaged = s.query(ImageRow).filter(ImageRow.path == b"m/other0.jpg").one().id
        s.execute(update(ImageRow).where(ImageRow.id == damaged).values(cls=None))
    with Library.open(indexed, url=catalog_url) as library, LibrarySearch(library, encoder) as lib:  # readers carry on
        assert [h.id for h in lib.search(synthetic_photo(200, 150, seed=10), k=10)].count(damaged) == 0
        assert lib.similar("a/p.jpg", k=1)[0].path == "b/p-small.jpg"
        assert len(find_duplicates(lib.library, threshold=THRESHOLD)) == 1
        with pytest.raises(NeedsRepairError, match="no usable vectors"):  # the CLI adds `dinoseek verify --repair`
            lib.row_vector("m/other0.jpg", "cls")
    result = invoke("verify", indexed, *url)
    assert result.exit_code == 1 and "1 embedded rows have no vectors" in result.output
    result = invoke("verify", indexed, *url, "--repair")
    assert result.exit_code == 0 and "1 images with damaged vectors dropped" in result.output, result.output
    assert index(indexed, encoder, url=catalog_url)["embedded"] == 1  # found again as a new file, embedded afresh
    assert rows(indexed, url=catalog_url)[b"m/other0.jpg"].cls is not None
    assert invoke("verify", indexed, *url).exit_code == 0


# ---- 5 and 6. --protect and --in-folder ---------------------------------------------------------------------------
ODD = b"caf\xe9"  # a folder name that is not UTF-8


@pytest.fixture
def protected_library(tmp_path, encoder, catalog_url):
    root = tmp_path / "photos"
    for i, rels in enumerate([("keep/a.jpg", "keep/a-copy.jpg", "other/a.jpg"),  # two copies protected
                              ("keep/b.jpg", "keep/sub/b.jpg"),  # every copy protected
                              (os.fsdecode(ODD + b"/c.jpg"), "other/c.jpg")]):  # protected by raw bytes
        for rel in rels:
            save(root / rel, synthetic_photo(120, 90, seed=30 + i))
    index(root, encoder, url=catalog_url)
    return root


def test_protect_keeps_every_protected_copy_also_in_non_utf8_folders(protected_library, catalog_url):
    root = protected_library
    odd_folder = os.fsdecode(os.fsencode(root) + b"/" + ODD)  # as the command line hands it over
    with Library.open(root, url=catalog_url, write=True) as library:
        groups = find_duplicates(library, exact_only=True, protected=("keep", odd_folder))
        by_keeper = {g.keeper.raw_path: g for g in groups}
        assert sorted(by_keeper) == [b"caf\xe9/c.jpg", b"keep/a.jpg"]  # the all-protected b group: nothing to do
        a = by_keeper[b"keep/a.jpg"]
        assert [m.path for m in a.others] == ["other/a.jpg"]
        assert a.reason.endswith("all 2 copies in protected folders stay")
        assert [m["keep"] for m in a.to_dict()["members"]] == [True, True, False]
        assert by_keeper[ODD + b"/c.jpg"].reason == "in a protected folder"
        moved = sorted(os.fsencode(s.src.relative_to(root)) for s in apply(library, groups, "move").done)
    assert moved == [b"other/a.jpg", b"other/c.jpg"]
    for rel in ("keep/a.jpg", "keep/a-copy.jpg", "keep/b.jpg", "keep/sub/b.jpg", os.fsdecode(ODD + b"/c.jpg")):
        assert (root / rel).exists(), rel


def test_in_folder_takes_the_spellings_protect_takes(protected_library, catalog_url):
    root, url = protected_library, url_args(catalog_url)
    with Library.open(root, url=catalog_url) as library:
        def groups(folder=None):
            return [[m.id for m in g.members] for g in find_duplicates(library, exact_only=True, folder=folder)]

        assert len(groups()) == 3
        for spelling in (".", "./", str(root)):
            assert groups(spelling) == groups()
        for spelling in ("other", "./other/", str(root / "other"), "keep/../other"):
            found = find_duplicates(library, exact_only=True, folder=spelling)
            assert sorted(sorted(m.path for m in g.members) for g in found) == [
                ["caf\\xe9/c.jpg", "other/c.jpg"], ["keep/a-copy.jpg", "keep/a.jpg", "other/a.jpg"]]
        odd = find_duplicates(library, exact_only=True, folder=os.fsdecode(ODD))
        assert [sorted(m.raw_path for m in g.members) for g in odd] == [[ODD + b"/c.jpg", b"other/c.jpg"]]
        with pytest.raises(ValueError, match="^folder /: not inside"):  # the CLI says --in-folder (below)
            find_duplicates(library, folder="/")
        with pytest.raises(ValueError, match="^folder nope: no such folder"):
            find_duplicates(library, folder="nope")
    result = invoke("dedup", root, *url, "--exact", "--in-folder", root.parent)
    assert result.exit_code == 1 and result.output.startswith("Error: --in-folder") and "not inside" in result.output
    assert invoke("dedup", root, *url, "--exact", "--in-folder", ".").exit_code == 0


# ---- 7. a read-only library folder ----------------------------------------------------------------------------------
@contextlib.contextmanager
def mounted_read_only(folder):
    """`folder` bind-mounted read-only over itself: the only way to test as root, whom file
    permissions do not stop."""
    def mount(*args):
        return subprocess.run(["mount", *args], capture_output=True, text=True)

    bound = mount("--bind", str(folder), str(folder))
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({bound.stderr.strip()}); a read-only mount is needed to test this")
    try:
        remounted = mount("-o", "remount,ro,bind", str(folder))
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount read-only here ({remounted.stderr.strip()})")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _leave_a_wal(catalog):
    """A writer killed after committing, before any checkpoint: its last commit lives only in -wal."""
    code = ("import os, sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1])\n"
            "db.execute('PRAGMA wal_autocheckpoint=0')\n"
            "db.execute(\"INSERT INTO runs (started_at, status, counts) VALUES ('2024-01-01', 'in-the-wal', '{}')\")\n"
            "db.commit()\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(catalog)], check=True)
    assert os.path.exists(f"{catalog}-wal")


@pytest.mark.parametrize("state", ["closed-cleanly", "writer-killed"])
def test_a_read_only_library_folder_serves_readers_and_refuses_writers(indexed, tiny_folder, state):
    import json

    folder = indexed / ".dinoseek"
    if state == "writer-killed":
        _leave_a_wal(folder / "catalog.sqlite")
    listing = sorted(os.listdir(folder))
    with mounted_read_only(folder):
        info = invoke("info", indexed, "--json")
        assert info.exit_code == 0, info.output
        last_run = json.loads(info.output)["last_run"]["status"]
        assert last_run == ("in-the-wal" if state == "writer-killed" else "finished")  # the -wal was read
        assert invoke("verify", indexed).output.endswith("ok: catalog and indexes agree\n")
        dedup = invoke("dedup", indexed, "--threshold", THRESHOLD)
        assert dedup.exit_code == 0 and "1 groups" in dedup.output
        similar = invoke("similar", "a/p.jpg", "--root", indexed, "-k", 1)
        assert similar.exit_code == 0 and "b/p-small.jpg" in similar.output
        result = invoke("search", indexed / "a/p.jpg", "--root", indexed, "--weights", tiny_folder, "-k", 1)
        assert result.exit_code == 0 and "a/p.jpg" in result.output
        for writer in (("index", indexed, "--weights", tiny_folder, "--workers", 0),
                       ("dedup", indexed, "--action", "move", "--apply"), ("verify", indexed, "--repair")):
            one_line_error(invoke(*writer), f"{folder} is read-only")
        assert sorted(os.listdir(folder)) == listing


def test_opening_a_library_again_never_drops_the_sqlite_locks_of_open_connections(indexed):
    """Closing any descriptor of the catalog drops every POSIX lock the process holds on it, SQLite's
    too: another process then believes nobody has the catalog open, checkpoints and deletes the -wal
    under live connections. A server reopens its reader while connections are open: that reopen must
    never open the file outside SQLite."""
    catalog = indexed / ".dinoseek/catalog.sqlite"
    probe = f"""
import fcntl, os, struct, sys
fd = os.open({str(catalog)!r}, os.O_RDONLY)
# SQLite's shared-lock range of the database file (SHARED_FIRST = 2**30 + 2, 510 bytes); in WAL mode
# every open connection holds a read lock there for as long as it is open.
lock = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 2**30 + 2, 510, 0)
sys.exit(0 if struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, lock))[0] != fcntl.F_UNLCK else 3)
"""
    with Library.open(indexed) as first:
        with first.catalog.session() as s:
            s.connection().exec_driver_sql("SELECT count(*) FROM images").all()
            assert subprocess.run([sys.executable, "-c", probe]).returncode == 0  # the lock the probe sees
            with Library.open(indexed):  # the reopen a long-lived process does
                pass
            assert subprocess.run([sys.executable, "-c", probe]).returncode == 0, "the reopen dropped SQLite's lock"
