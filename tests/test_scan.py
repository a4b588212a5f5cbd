"""The scanner's memory: nothing kept per ordinary file, while every second path to a file (hard
link, followed symlink, file bind mount) is still reported as "linked"."""

from __future__ import annotations

import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest

import dinoseek.indexer.scan as scan_module
from dinoseek.indexer.scan import ScanEntry, ScanProblem, scan

FILES_PER_FOLDER = 100  # a fixed folder size: a folder's listing is held while it is walked, by design
JPEG_HEAD = b"\xff\xd8\xff"  # enough for the scanner (it judges by extension and never decodes)


def photo_tree(root: Path, folders: int) -> Path:
    for f in range(folders):
        folder = root / f"{f:04d}"
        folder.mkdir(parents=True)
        for i in range(FILES_PER_FOLDER):
            (folder / f"IMG_{i:04d}.jpg").write_bytes(JPEG_HEAD)
    return root


@pytest.fixture
def inodes(monkeypatch):
    """The scanner's per-inode bookkeeping of each scan() call, to look at after the walk."""
    made = []

    class Recorded(scan_module._Inodes):
        def __init__(self, rank):
            super().__init__(rank)
            made.append(self)

    monkeypatch.setattr(scan_module, "_Inodes", Recorded)
    return made


def outcome(items) -> dict[bytes, str]:
    return {i.rel: "file" if isinstance(i, ScanEntry) else f"{i.status}: {i.reason}" for i in items}


def test_single_link_files_are_not_remembered(tmp_path, inodes):
    root = photo_tree(tmp_path / "photos", folders=20)
    items = list(scan(root))
    assert len(items) == 20 * FILES_PER_FOLDER and all(isinstance(i, ScanEntry) for i in items)
    (bookkeeping,) = inodes
    assert bookkeeping.best == {} and bookkeeping.waiting == {}


def _peak_bytes_of_a_walk(root: Path) -> int:
    tracemalloc.start()
    try:
        count = sum(1 for _ in scan(root))  # items are dropped as they come, as the indexer's plan drops them
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert count


def test_scanner_memory_does_not_grow_with_the_file_count(tmp_path):
    small = _peak_bytes_of_a_walk(photo_tree(tmp_path / "small", folders=5))  # 500 files
    large = _peak_bytes_of_a_walk(photo_tree(tmp_path / "large", folders=40))  # 4,000 files
    # What grows is per folder (its inode, its name on the stack, its entry in the parent's
    # listing): ~5 kB for the 35 more folders, about 1 byte per added file. Remembering each file's
    # inode (~250 bytes per file) would add ~870 kB.
    per_added_file = (large - small) / 3500
    assert per_added_file < 25, (small, large)


def test_hard_linked_files_are_still_recognised(tmp_path, inodes):
    root = photo_tree(tmp_path / "photos", folders=2)
    os.link(root / "0000/IMG_0007.jpg", root / "0001/linked.jpg")
    os.link(root / "0000/IMG_0007.jpg", root / "0001/zz-third.jpg")
    seen = outcome(scan(root))
    assert seen[b"0000/IMG_0007.jpg"] == "file"
    assert seen[b"0001/linked.jpg"] == seen[b"0001/zz-third.jpg"] == "linked: same file as 0000/IMG_0007.jpg"
    assert sum(v == "file" for v in seen.values()) == 2 * FILES_PER_FOLDER
    (bookkeeping,) = inodes
    assert list(bookkeeping.best.values()) == [(b"0000/IMG_0007.jpg", 0)]  # only the file with three links


def test_a_better_ranked_hard_link_still_displaces_the_first_path(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.jpg").write_bytes(JPEG_HEAD)
    (root / "b.jpg").write_bytes(JPEG_HEAD)  # one link: yielded at once, whatever its rank
    os.link(root / "a.jpg", root / "c.jpg")  # the path the catalog embeds ranks 0
    items = list(scan(root, rank=lambda rel: 0 if rel == b"c.jpg" else 1))
    assert outcome(items) == {b"a.jpg": "linked: same file as c.jpg", b"b.jpg": "file", b"c.jpg": "file"}
    assert [i.rel for i in items] == [b"b.jpg", b"a.jpg", b"c.jpg"]  # a.jpg was held back until c.jpg came


def test_followed_symlinks_to_single_link_files_are_still_recognised(tmp_path, inodes):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "a/x.jpg").write_bytes(JPEG_HEAD)
    os.symlink(root / "a/x.jpg", root / "alias.jpg")
    os.symlink(root / "a", root / "a/loop")
    # Files of a folder come before its subfolders: the link is met first and is the file.
    followed = outcome(scan(root, follow_symlinks=True))
    assert followed == {b"alias.jpg": "file", b"a/x.jpg": "linked: same file as alias.jpg"}
    assert outcome(scan(root)) == {b"a/x.jpg": "file"}  # not followed: the link is no path to it
    followed, not_followed = inodes
    assert len(followed.best) == 1 and not_followed.best == {}


def test_an_inode_remembered_while_it_had_links_keeps_its_first_path():
    """A link removed during the walk: the second path shows one link, and is still a second path."""
    files = scan_module._Inodes(lambda rel: 0)
    first = list(files.offer((1, 7), ScanEntry(b"a.jpg", 3, 0), shared=True))
    second = list(files.offer((1, 7), ScanEntry(b"b.jpg", 3, 0), shared=False))
    assert first == [ScanEntry(b"a.jpg", 3, 0)]
    assert second == [ScanProblem(b"b.jpg", "linked", "same file as a.jpg")]


def test_mounted_files_are_read_from_mountinfo_with_its_escapes(tmp_path):
    root = tmp_path / "my photos"
    (root / "in a folder").mkdir(parents=True)
    target = root / "in a folder" / "mounted\\here.jpg"
    target.write_bytes(JPEG_HEAD)
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(JPEG_HEAD)

    def escaped(path: Path) -> str:
        return str(path).replace("\\", "\\134").replace(" ", "\\040")

    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("\n".join([
        f"63 43 254:0 /src/a.jpg {escaped(target)} rw,relatime - ext4 /dev/vda rw",
        f"64 43 254:0 /src/dir {escaped(root / 'in a folder')} rw,relatime - ext4 /dev/vda rw",  # a folder
        f"65 43 254:0 /src/b.jpg {escaped(outside)} rw,relatime - ext4 /dev/vda rw",  # not under the root
        f"66 43 254:0 /src/c.jpg {escaped(root / 'gone.jpg')} rw,relatime - ext4 /dev/vda rw",  # vanished
        "garbage",
    ]) + "\n")
    st = target.stat()
    assert scan_module._mounted_files(os.fsencode(root), str(mountinfo)) == {(st.st_dev, st.st_ino)}
    assert scan_module._mounted_files(os.fsencode(root), str(tmp_path / "no-such-file")) == frozenset()


def _mount(source: Path, target: Path) -> bool:
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/mountinfo"), reason="bind mounts: Linux")
def test_bind_mounted_files_and_folders_are_reached_once(tmp_path, inodes):
    root = tmp_path / "photos"
    (root / "a/sub").mkdir(parents=True)
    (root / "b/mnt").mkdir(parents=True)
    (root / "a/f.jpg").write_bytes(JPEG_HEAD)
    (root / "a/sub/x.jpg").write_bytes(JPEG_HEAD)
    (root / "b/g.jpg").write_bytes(b"")
    if not _mount(root / "a/sub", root / "b/mnt"):
        pytest.skip("mount --bind needs root (CAP_SYS_ADMIN)")
    try:
        assert _mount(root / "a/f.jpg", root / "b/g.jpg")
        try:
            assert os.stat(root / "b/g.jpg").st_nlink == 1  # one file, one link, two paths
            seen = outcome(scan(root))
        finally:
            subprocess.run(["umount", str(root / "b/g.jpg")], check=True)
    finally:
        subprocess.run(["umount", str(root / "b/mnt")], check=True)
    # The folder mounted twice is entered once; the file mounted over b/g.jpg is a second path.
    assert seen == {b"a/f.jpg": "file", b"a/sub/x.jpg": "file", b"b/g.jpg": "linked: same file as a/f.jpg"}
    assert [list(i.best) for i in inodes] == [[(os.stat(root / "a/f.jpg").st_dev, os.stat(root / "a/f.jpg").st_ino)]]
