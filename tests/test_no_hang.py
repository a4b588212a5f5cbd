"""Nothing hangs, nothing reads forever: FIFOs, devices and hung decoders cost bounded time and memory.

Every test here runs under an alarm, so a regression fails instead of blocking the suite; the CLI
checks run in a child process with its address space capped, as a user's machine would kill it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo
from PIL import Image

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.decode import MAX_FILE_BYTES, DecodeError, read_image
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, run_index
from dinoseek.indexer.pipeline import _decode_task as _real_decode_task
from dinoseek.indexer.store import build_index, max_index_bytes, read_index
from dinoseek.model import Encoder
from dinoseek.retrieval.cli import main

REPO = Path(__file__).resolve().parents[1]
CHILD_MEMORY = 4 << 30  # address space of the CLI child: far below what /dev/zero would take
CHILD_SECONDS = 90


class Hung(Exception):
    """The alarm went off: the code under test blocked."""


@pytest.fixture(autouse=True)
def alarm():
    """Fail a test that blocks (a FIFO open, an endless read) after 60 s instead of hanging."""
    def ring(*_):
        raise Hung("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


def photos(root: Path, count: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        synthetic_photo(120, 90, seed=i).save(root / f"p{i}.jpg")
    return root


def rows(root: Path) -> dict[bytes, ImageRow]:
    with Library.open(root) as library, library.catalog.session() as s:
        return {r.path: r for r in s.query(ImageRow).all()}


def index(root: Path, encoder, **options) -> dict:
    options.setdefault("workers", 0)
    with Library.open(root, write=True, create=True) as library:
        return run_index(library, encoder, Options(**options))


# ---- photos -------------------------------------------------------------------------------------
def test_fifo_and_device_photos_are_unreadable_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    for name in ("pipe.jpg", "zero.jpg"):
        started = time.monotonic()
        with pytest.raises(DecodeError) as caught:
            read_image(tmp_path / name)
        assert caught.value.status == "unreadable"
        assert "not a regular file" in caught.value.reason
        assert time.monotonic() - started < 5


def test_oversized_photo_is_refused_unread(tmp_path, monkeypatch):
    import dinoseek.indexer.decode as decode

    path = tmp_path / "big.jpg"
    synthetic_photo(64, 48).save(path)
    monkeypatch.setattr(decode, "MAX_FILE_BYTES", 100)
    with pytest.raises(DecodeError) as caught:
        read_image(path)
    assert caught.value.status == "too-large" and "100-byte limit" in caught.value.reason
    assert MAX_FILE_BYTES == 1 << 30  # the real cap is untouched


class _RecordingReads:
    """A file object that records what its reads ask for (size, bytes read before), and runs
    `before_read` first."""

    def __init__(self, f, asked: list, before_read) -> None:
        self._f, self._asked, self._before_read, self._read = f, asked, before_read, 0

    def read(self, n=-1):
        if not self._asked:
            self._before_read()
        self._asked.append((n, self._read))
        data = self._f.read(n)
        self._read += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _record_reads(monkeypatch, before_read=lambda: None) -> list:
    """What read_regular's reads ask for, (size, bytes read before) each; `before_read` runs once
    the file is open and stat'ed, just before its first read."""
    import dinoseek.model.files as files

    real_open, asked = files.open_regular, []
    monkeypatch.setattr(files, "open_regular",
                        lambda path, **kw: _RecordingReads(real_open(path, **kw), asked, before_read))
    return asked


def test_photo_read_asks_for_its_size_not_the_cap(tmp_path, monkeypatch):
    # read(n) allocates n bytes first: asking for the 1 GiB cap cost a 1 GiB mapping per photo.
    path = tmp_path / "p.jpg"
    synthetic_photo(64, 48).save(path)
    asked = _record_reads(monkeypatch)
    decoded = read_image(path)
    assert decoded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert asked and all(0 < n <= path.stat().st_size + 1 for n, _ in asked)


@pytest.mark.parametrize("grows_by, cap, whole", [(30, 100, True), (60, 100, False)])
def test_file_growing_while_read_is_read_on_up_to_the_cap(tmp_path, monkeypatch, grows_by, cap, whole):
    from dinoseek.model.files import FileTooLargeError, read_regular

    path = tmp_path / "journal.json"
    path.write_bytes(b"x" * 50)
    with path.open("ab") as appender:
        asked = _record_reads(monkeypatch, lambda: (appender.write(b"y" * grows_by), appender.flush()))
        if whole:
            assert read_regular(path, max_bytes=cap) == b"x" * 50 + b"y" * grows_by
        else:
            with pytest.raises(FileTooLargeError, match=f"grew beyond the {cap}-byte limit"):
                read_regular(path, max_bytes=cap)
    assert asked[0] == (51, 0)  # the size fstat gave, + 1
    assert all(0 < n <= cap + 1 - before for n, before in asked)  # never more than the cap in all


def _swap_for_fifo_after_scan(monkeypatch, victim: Path):
    """The scan sees `victim` as a regular photo; then, before decoding, it becomes a FIFO."""
    import dinoseek.indexer.pipeline as pipeline

    real_scan = pipeline.scan

    def scan_then_swap(*args, **kwargs):
        yield from real_scan(*args, **kwargs)
        victim.unlink()
        os.mkfifo(victim)

    monkeypatch.setattr(pipeline, "scan", scan_then_swap)


@pytest.mark.parametrize("workers", [0, 2])
def test_photo_swapped_for_a_fifo_during_a_run_is_recorded(tmp_path, encoder, monkeypatch, workers):
    root = photos(tmp_path / "photos")
    victim = root / "p2.jpg"
    kept = victim.read_bytes()
    _swap_for_fifo_after_scan(monkeypatch, victim)
    started = time.monotonic()
    counts = index(root, encoder, workers=workers)
    assert time.monotonic() - started < 30
    assert counts["embedded"] == 5 and counts["failed"] == 1
    row = rows(root)[b"p2.jpg"]
    assert row.status == "unreadable" and "FIFO" in row.reason
    monkeypatch.undo()
    victim.unlink()
    victim.write_bytes(kept)
    index(root, encoder)  # unreadable is transient: retried, and embedded now
    assert rows(root)[b"p2.jpg"].status == EMBEDDED


def _hanging_decode(root_bytes, task, *args):
    """A decoder stuck for good on one file (a codec loop, a dead network mount)."""
    if task.rel == b"p3.jpg":
        Path(os.fsdecode(root_bytes), "..", "hung.pid").write_text(str(os.getpid()))
        time.sleep(600)
    return _real_decode_task(root_bytes, task, *args)


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_a_hung_decode_task_times_out_and_the_run_finishes(tmp_path, encoder, monkeypatch):
    import dinoseek.indexer.pipeline as pipeline

    root = photos(tmp_path / "photos", count=10)
    monkeypatch.setattr(pipeline, "_decode_task", _hanging_decode)
    started = time.monotonic()
    counts = index(root, encoder, workers=2, decode_timeout=1.0)
    assert time.monotonic() - started < 30
    catalog = rows(root)
    assert catalog[b"p3.jpg"].status == "crashed"
    assert catalog[b"p3.jpg"].reason == "decoding took longer than 1 s"
    assert counts["embedded"] == 9 and counts["failed"] == 1  # only the hung file is lost
    pid = int((tmp_path / "hung.pid").read_text())
    deadline = time.monotonic() + 10
    while not _gone_or_zombie(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone_or_zombie(pid), "the hung worker was left running"
    monkeypatch.undo()
    index(root, encoder)  # crashed is transient: retried next run
    assert rows(root)[b"p3.jpg"].status == EMBEDDED


# ---- index files ----------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path) -> tuple[Path, str, bytes]:
    vectors = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    data = build_index("Flat", 8, vectors, np.arange(10), requested="auto").serialize()
    path = tmp_path / "cls.faiss"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest(), data


def test_index_file_that_is_no_regular_file_reads_as_damaged(tmp_path, caplog):
    path, checksum, data = _checkpoint(tmp_path)
    good = tmp_path / "elsewhere.faiss"
    good.write_bytes(data)
    assert read_index(path, checksum) is not None
    for make in (lambda: os.mkfifo(path), lambda: os.symlink("/dev/zero", path), lambda: os.symlink(good, path)):
        path.unlink()
        make()
        started = time.monotonic()
        assert read_index(path, checksum, max_bytes=max_index_bytes(10, 8)) is None
        assert time.monotonic() - started < 5
    assert "cls.faiss is a symbolic link" in caplog.text and "not a regular file" in caplog.text


def test_oversized_index_file_is_not_read(tmp_path, caplog):
    path, checksum, data = _checkpoint(tmp_path)
    assert read_index(path, checksum, max_bytes=len(data)) is not None
    assert read_index(path, checksum, max_bytes=len(data) - 1) is None
    assert "byte limit" in caplog.text


@pytest.mark.parametrize("factory, count",
                         [("Flat", 300), ("IVF8,Flat", 2000), ("IVF16,SQ8", 2000), ("IVF4,PQ4x4", 1000)])
def test_index_size_bound_holds_for_the_indexes_we_build(factory, count):
    dim = 32
    vectors = np.random.default_rng(1).standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(factory, dim, vectors, np.arange(count), requested=factory)
    assert len(index.serialize()) <= max_index_bytes(count, dim)


# ---- the CLI, in a child process with bounded memory -------------------------------------------------
@pytest.fixture(scope="module")
def library_template(tmp_path_factory, encoder):
    root = photos(tmp_path_factory.mktemp("template") / "photos")
    index(root, encoder)
    return root


# One child runs every command (torch imported once); each command's exit code, last line (stdout
# on success) and stderr come back as JSON. RLIMIT_AS turns an endless read into a MemoryError
# instead of a machine-wide OOM.
_CHILD = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    from dinoseek.retrieval.cli import main
    out = []
    for args in json.loads(sys.argv[1]):
        result = CliRunner().invoke(main, args)
        lines = result.output.strip().splitlines() or [repr(result.exception)]
        out.append([result.exit_code, lines[-1] if result.exit_code else result.stdout.strip(), result.stderr])
    print(json.dumps(out))
""")


class Outcome(NamedTuple):
    code: int
    line: str  # the last line of a failure; the whole stdout of a success
    stderr: str


def run_cli_bounded(commands: list[list[str]]) -> list[Outcome]:
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    signal.alarm(0)  # the child has its own timeout, longer than the test alarm
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(commands)], capture_output=True, text=True,
                          timeout=CHILD_SECONDS, preexec_fn=limit, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return [Outcome(*r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


def _replace(path: Path, hazard: str) -> None:
    path.unlink()
    if hazard == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("hazard", ["fifo", "dev-zero"])
def test_cli_with_a_fifo_or_dev_zero_as_index_file(tmp_path, library_template, tiny_folder, hazard):
    root = tmp_path / "photos"
    shutil.copytree(library_template, root, symlinks=True)
    with Library.open(root) as library:
        cls_file = library.index_set.file("cls")
    _replace(cls_file, hazard)
    weights = ["--weights", str(tiny_folder), "--precision", "fp32"]
    fifo_query, zero_query = tmp_path / "query.jpg", tmp_path / "zero.jpg"
    os.mkfifo(fifo_query)
    os.symlink("/dev/zero", zero_query)
    started = time.monotonic()
    results = run_cli_bounded([
        ["verify", str(root)],
        ["similar", str(root / "p0.jpg"), "--root", str(root), "--json"],
        ["search", str(root / "p1.jpg"), "--root", str(root), "--json", *weights],
        ["dedup", str(root), "--json"],
        ["search", str(fifo_query), "--root", str(root), *weights],
        ["search", str(zero_query), "--root", str(root), *weights],
        ["embed", str(fifo_query), *weights],
        ["verify", "--repair", str(root)],
        ["verify", str(root)],
    ])
    assert time.monotonic() - started < CHILD_SECONDS
    verify, similar, search, dedup, fifo, zero, embed, repair, after = results
    assert verify[:2] == (1, f"Error: 1 problem(s); run `dinoseek verify {root} --repair`")
    assert similar[0] == 0 and json.loads(similar[1])[0]["path"] != "p0.jpg"  # answered from the rebuilt index
    assert search[0] == 0 and json.loads(search[1])[0]["path"] == "p1.jpg"
    assert dedup[0] == 0 and "groups" in json.loads(dedup[1])
    not_regular = "is not a regular file (FIFO, device or socket)"
    assert fifo[:2] == (1, f"Error: cannot read query image {fifo_query}: {not_regular}")
    assert zero[:2] == (1, f"Error: cannot read query image {zero_query}: {not_regular}")
    # embed skips the FIFO with one line, then ends the run with one line (both on stderr)
    assert embed == (1, "Error: nothing embedded: 1 file(s) skipped (see above)",
                     f"skipped {fifo_query}: {not_regular}\nError: nothing embedded: 1 file(s) skipped (see above)\n")
    assert repair[0] == 0 and after[:2] == (0, "ok: catalog and indexes agree")

    with Library.open(root) as library:
        _replace(library.index_set.file("patch"), hazard)
    index_run, after = run_cli_bounded([["index", str(root), "--workers", "0", *weights], ["verify", str(root)]])
    assert index_run[0] == 0 and "0 embedded" in index_run[1]
    assert after[:2] == (0, "ok: catalog and indexes agree")
    with Library.open(root) as library:
        assert library.index_set.file("patch").is_file() and not library.index_set.file("patch").is_symlink()


# ---- embed decodes like index ------------------------------------------------------------------------
def test_embed_refuses_what_index_refuses(tiny_folder, tmp_path):
    from collection import _png_header_only

    eps = tmp_path / "drawing.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 40000, 40000)
    for path, reason in ((eps, "format EPS is not supported"), (bomb, "image header claims too many pixels (")):
        result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), str(path)])
        assert result.exit_code == 1 and result.stdout == ""
        # One line for the file (the decoder's reason, as `index` records it), one for the run.
        skipped, error = result.stderr.splitlines()
        assert skipped.startswith(f"skipped {path}: {reason}")
        assert error == "Error: nothing embedded: 1 file(s) skipped (see above)"


def test_embed_gives_the_vector_index_stored_for_an_exif_rotated_jpeg(tiny_folder, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to view
    synthetic_photo(1200, 700, seed=5).save(root / "turned.jpg", exif=exif, quality=90)  # draft-decoded too
    weights = ["--weights", str(tiny_folder), "--precision", "fp32"]
    indexed = CliRunner().invoke(main, ["index", str(root), "--workers", "0", *weights])
    assert indexed.exit_code == 0, indexed.output
    embedded = CliRunner().invoke(main, ["embed", "--json", *weights, str(root / "turned.jpg")])
    assert embedded.exit_code == 0, embedded.output
    with Library.open(root) as library:
        _, stored = library.catalog.vector_sets(("cls", "patch"))
    (line,) = embedded.stdout.splitlines()  # JSON Lines: one object for the one image
    row = json.loads(line)
    for vector, kind in ((stored[0][0], "cls"), (stored[1][0], "patch")):
        got = np.asarray(row[kind], dtype=np.float32)
        cosine = float(vector @ got / np.linalg.norm(vector) / np.linalg.norm(got))
        assert cosine > 0.999, (kind, cosine)
