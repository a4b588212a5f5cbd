"""Two machines simulated: processes that share the library folder and one PostgreSQL catalog. One
indexes; another searches meanwhile and only ever gets committed rows; a third, with a library folder
of its own (so the POSIX lock on the shared folder cannot stop it, as on another machine), is refused
by the catalog's advisory lock, naming the writer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from conftest import synthetic_photo
from sqlalchemy import create_engine, text

PHOTOS = 40

# The indexer, its encoder slowed (a sleep per batch); after its first batches it also waits while the
# file argv[2] exists, so the run outlasts a third process's start however loaded the machine is.
SLOW_INDEXER = textwrap.dedent("""
    import os, sys, time
    from dinoseek.model.encoder import Encoder
    real, batches = Encoder.embed_pixels, []
    def slow(self, *args, **kwargs):
        time.sleep(float(sys.argv[1]))
        batches.append(1)
        deadline = time.monotonic() + 300
        while len(batches) > 5 and os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(self, *args, **kwargs)
    Encoder.embed_pixels = slow
    from dinoseek.retrieval.cli import main
    main(sys.argv[3:], prog_name="dinoseek")
""")

# The searcher: opens the library afresh for every query (as each `dinoseek search` would), searches
# with k above the library's size, and checks each hit against the catalog in a new transaction.
SEARCHER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from sqlalchemy import create_engine, text
    from dinoseek.indexer.errors import NotIndexedError, NeedsUpgradeError
    from dinoseek.indexer.library import Library
    from dinoseek.retrieval.api import LibrarySearch
    root, url, out, stop = sys.argv[1:5]
    engine = create_engine(url)
    rng = np.random.default_rng(0)
    with open(out, "w") as log:
        while True:
            stopping = __import__("os").path.exists(stop)
            try:
                with Library.open(root, url=url) as library:
                    dim = library.dim()
                    if dim is None:
                        raise NotIndexedError("no model yet", root)
                    vector = rng.normal(size=dim).astype(np.float32)
                    with LibrarySearch(library) as lib:
                        hits = lib.search(vector, k=100)
            except (NotIndexedError, NeedsUpgradeError):
                time.sleep(0.05)
                continue
            ids = [h.id for h in hits]
            with engine.connect() as connection:
                rows = {i: (bytes(p).decode(), s) for i, p, s in connection.execute(
                    text("SELECT id, path, status FROM images WHERE id = ANY(:ids)"), {"ids": ids})}
                embedded = connection.execute(text("SELECT count(*) FROM images WHERE status = 'embedded'")).scalar()
            bad = [(h.id, h.path) for h in hits if rows.get(h.id) != (h.path, "embedded")]
            log.write(json.dumps({"hits": [[h.id, h.path] for h in hits], "bad": bad, "embedded_after": embedded}) + "\\n")
            log.flush()
            if stopping:
                break
""")


def test_one_machine_indexes_another_searches_a_third_is_refused(tmp_path, tiny_folder, postgres_url):
    root = tmp_path / "share" / "photos"  # the shared filesystem: photos and ROOT/.dinoseek
    root.mkdir(parents=True)
    for i in range(PHOTOS):
        synthetic_photo(96, 72, seed=200 + i).save(root / f"p{i:02d}.jpg", quality=90)
    log, stop = tmp_path / "searches.jsonl", tmp_path / "stop"
    index_args = ["index", str(root), "--url", postgres_url, "--weights", str(tiny_folder), "--precision", "fp32",
                  "--workers", "0", "--batch-size", "1", "--checkpoint-seconds", "0"]
    searcher = subprocess.Popen([sys.executable, "-c", SEARCHER, str(root), postgres_url, str(log), str(stop)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hold = tmp_path / "hold"  # the indexer waits, mid-run, until machine 3 has been answered
    hold.touch()
    indexer = subprocess.Popen([sys.executable, "-c", SLOW_INDEXER, "0.15", str(hold), *index_args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and indexer.poll() is None and not _searches(log):
            time.sleep(0.05)  # the searcher has seen the first committed batches
        assert indexer.poll() is None, "the indexer finished before the searcher saw a partial library"
        # Machine 3: the same catalog, its own library folder (no shared POSIX lock with machine 1).
        refused = subprocess.run([sys.executable, "-m", "dinoseek.retrieval.cli", *index_args, "--library",
                                  str(tmp_path / "machine3-lib")], capture_output=True, text=True, timeout=180, check=False)
        running = indexer.poll() is None
        hold.unlink()
        indexed = indexer.communicate(timeout=300)[0]
        stop.touch()
        searched = searcher.communicate(timeout=120)[0]
    finally:
        for process in (indexer, searcher):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert indexer.returncode == 0, indexed[-2000:]
    assert f"{PHOTOS} embedded" in indexed
    assert searcher.returncode == 0, searched[-2000:]
    assert running, "machine 3 ran after the indexer had finished: the refusal was not tested"
    assert refused.returncode == 1, refused.stdout + refused.stderr
    error = refused.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("Error: ") and "is being written by dinoseek writer pid " \
        f"{indexer.pid} on " in error[0], refused.stderr

    searches = _searches(log)
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            final = {i: bytes(p).decode() for i, p in connection.execute(
                text("SELECT id, path FROM images WHERE status = 'embedded'"))}
    finally:
        engine.dispose()
    assert len(final) == PHOTOS
    assert all(s["bad"] == [] for s in searches)  # every hit was a committed, embedded row, at its path
    for s in searches:  # and is still there, at the same path: an index run from scratch deletes nothing
        assert all(final.get(i) == path for i, path in s["hits"])
    sizes = [len(s["hits"]) for s in searches]
    assert min(sizes) < PHOTOS and sizes[-1] == PHOTOS  # searched mid-run, and the whole library at the end
    assert sizes == sorted(sizes)  # a later search never sees fewer rows than an earlier one


def _searches(log) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
