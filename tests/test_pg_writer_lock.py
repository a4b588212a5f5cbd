"""The writer lock of a PostgreSQL catalog: an advisory lock in the database, so a writer on another
machine (here: another library folder, as a second mount would be, or another process) is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dinoseek.indexer.errors import LibraryLockedError
from dinoseek.indexer.library import Library


def test_a_second_writer_of_one_postgresql_catalog_is_refused_naming_the_first(tmp_path, postgres_url):
    first_root, second_root = tmp_path / "mount-a", tmp_path / "mount-b"  # no shared POSIX lock file
    first_root.mkdir(), second_root.mkdir()
    with Library.open(first_root, url=postgres_url, write=True, create=True):
        with pytest.raises(LibraryLockedError, match=rf"being written by dinoseek writer pid {os.getpid()} on "):
            Library.open(second_root, url=postgres_url, write=True, create=True)
        with Library.open(first_root, url=postgres_url) as reader:  # readers never wait
            assert reader.info()["total"] == 0
        with pytest.raises(LibraryLockedError):  # making a library is writing: create=True waits its turn
            Library.open(second_root, url=postgres_url, create=True)
    with Library.open(second_root, url=postgres_url, write=True, create=True):  # released on close
        pass


def test_the_advisory_lock_dies_with_a_killed_writer(tmp_path, postgres_url):
    root = tmp_path / "photos"
    root.mkdir()
    Library.open(root, url=postgres_url, write=True, create=True).close()
    script = textwrap.dedent(f"""
        import sys, time
        from dinoseek.indexer.library import Library
        library = Library.open({str(tmp_path / 'elsewhere')!r}, url={postgres_url!r}, write=True, create=True)
        print("locked", flush=True)
        time.sleep(120)
    """)
    (tmp_path / "elsewhere").mkdir()
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        with pytest.raises(LibraryLockedError, match=f"dinoseek writer pid {writer.pid} "):
            Library.open(root, url=postgres_url, write=True)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        # The server ends the dead session (its socket closed) and drops its lock with it.
        with Library.open(root, url=postgres_url, write=True):
            pass
    finally:
        writer.kill()
        writer.wait(timeout=30)


def test_a_refused_writer_leaves_the_lock_with_its_holder(tmp_path, postgres_url):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    with Library.open(tmp_path / "a", url=postgres_url, write=True, create=True):
        for _ in range(2):
            with pytest.raises(LibraryLockedError):
                Library.open(tmp_path / "b", url=postgres_url, write=True, create=True)
        with pytest.raises(LibraryLockedError):
            Library.open(tmp_path / "c", url=postgres_url, write=True, create=True)
