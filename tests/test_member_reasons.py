"""`dinoseek dedup` on an indexed library: every member carries its own reason and its exact
similarity to the keeper, in the terminal, --json, CSV and HTML; the keeper is the camera original."""

from __future__ import annotations

import csv
import html
import io
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo
from PIL import Image
from test_retrieval import THRESHOLD, index_with_cli

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.library import Library
from dinoseek.retrieval.cli import main

T0 = 1_600_000_000  # mtime of the camera originals (s)
ORIGINAL = "2021/summer/IMG_1045.JPG"
# path -> the reason that copy must give (the keeper's own reason is the group's)
EXPECTED = {
    "web/IMG_1045-small.jpg": "lower resolution (320x240 vs 640x480)",
    "exports/IMG_1045.png": "no camera metadata (the kept copy has Canon EOS R5, captured 2021-07-14 10:02:33)",
    "upscaled/IMG_1045-2x.png": ("more pixels (1280x960 vs 640x480) but no camera metadata: an upscale or re-save, "
                                 "not the original"),
    "backup/IMG_1045.JPG": "identical bytes, modified later (",
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def camera_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[271], exif[272] = "Canon", "EOS R5"
    exif.get_ifd(0x8769)[36867] = "2021:07:14 10:02:33"
    return exif


def build(root):
    photo = synthetic_photo(640, 480, seed=21)
    for folder in ("2021/summer", "web", "exports", "upscaled", "backup", "2022/trips/alps", "backup/alps"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    photo.save(root / ORIGINAL, quality=92, exif=camera_exif())
    photo.resize((320, 240)).save(root / "web/IMG_1045-small.jpg", quality=92, exif=camera_exif())
    photo.save(root / "exports/IMG_1045.png")  # a lossless re-save: larger, no EXIF
    photo.resize((1280, 960), Image.BICUBIC).save(root / "upscaled/IMG_1045-2x.png")
    (root / "backup/IMG_1045.JPG").write_bytes((root / ORIGINAL).read_bytes())
    # A RAW+JPEG pair and a byte copy of its JPEG that is *older*: the pair still wins.
    other = synthetic_photo(480, 360, seed=22)
    other.save(root / "2022/trips/alps/DSC_0102.jpg", quality=90, exif=camera_exif())
    (root / "2022/trips/alps/DSC_0102.NEF").write_bytes(b"not decoded: a RAW the indexer records as unsupported")
    (root / "backup/alps/DSC_0102.jpg").write_bytes((root / "2022/trips/alps/DSC_0102.jpg").read_bytes())
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (T0, T0))
    os.utime(root / "backup/IMG_1045.JPG", (T0 + 86400, T0 + 86400))  # the backup copy was made a day later
    os.utime(root / "backup/alps/DSC_0102.jpg", (T0 - 86400, T0 - 86400))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("reasons") / "photos"
    build(root)
    index_with_cli(root, tiny_folder)
    return root


def exact_cosines(root, keeper: str) -> dict[str, float]:
    """Cosine of each embedded row's CLS vector with the keeper's, from the catalog's float16 blobs."""
    with Library.open(root) as library, library.catalog.session() as s:
        rows = {r.path_text: np.frombuffer(r.cls, np.float16).astype(np.float32)
                for r in s.query(ImageRow).filter(ImageRow.status == EMBEDDED)}
    unit = {p: v / np.linalg.norm(v) for p, v in rows.items()}
    return {p: float(np.clip(v @ unit[keeper], -1, 1)) for p, v in unit.items()}


def groups_by_keeper(root) -> dict[str, dict]:
    result = invoke("dedup", root, "--threshold", THRESHOLD, "--json")
    assert result.exit_code == 0, result.output
    return {g["keep"]: g for g in json.loads(result.output)["groups"]}


def test_json_gives_each_member_its_reason_and_exact_similarity(root):
    groups = groups_by_keeper(root)
    assert set(groups) == {ORIGINAL, "2022/trips/alps/DSC_0102.jpg"}
    group = groups[ORIGINAL]
    members = {m["path"]: m for m in group["members"]}
    assert set(members) == {ORIGINAL, *EXPECTED}
    cosines = exact_cosines(root, ORIGINAL)
    for path, reason in EXPECTED.items():
        assert members[path]["reason"].startswith(reason), (path, members[path]["reason"])
        assert not members[path]["keep"]
        expected = 1.0 if members[path]["sha256"] == members[ORIGINAL]["sha256"] else cosines[path]
        assert members[path]["similarity"] == pytest.approx(expected, abs=1e-6), path
    # The keeper's reason holds for every member: one clause per rule that decided, with its count.
    assert group["reason"].startswith("highest resolution (640x480), over 1 copy; camera original (Canon EOS R5, "
                                      "captured 2021-07-14 10:02:33), over 2 copies; earliest modification time (")
    assert members[ORIGINAL]["similarity"] == 1.0 and members[ORIGINAL]["reason"] == group["reason"]
    assert members[ORIGINAL]["camera"] == "Canon EOS R5"


def test_raw_plus_jpeg_pair_is_kept_over_an_older_byte_copy(root):
    group = groups_by_keeper(root)["2022/trips/alps/DSC_0102.jpg"]
    assert group["kind"] == "exact"
    assert group["reason"] == "camera original: the JPEG of a RAW+JPEG pair"
    copy = next(m for m in group["members"] if m["path"] == "backup/alps/DSC_0102.jpg")
    assert copy["reason"] == "the kept copy is the JPEG of a RAW+JPEG pair" and copy["similarity"] == 1.0


def test_terminal_lines_carry_similarity_and_reason(root):
    result = invoke("dedup", root, "--threshold", THRESHOLD)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    cosines = exact_cosines(root, ORIGINAL)
    for path in ("web/IMG_1045-small.jpg", "exports/IMG_1045.png", "upscaled/IMG_1045-2x.png"):
        line = next(line for line in lines if line.startswith(f"    duplicate: {path} — "))
        assert line == f"    duplicate: {path} — similarity {cosines[path]:.3f}: {EXPECTED[path]}"
    backup = next(line for line in lines if line.startswith("    duplicate: backup/IMG_1045.JPG — "))
    assert backup.startswith("    duplicate: backup/IMG_1045.JPG — similarity 1.000: identical bytes, modified later")


def test_csv_rows_carry_each_member_reason_and_similarity(root, tmp_path):
    report = tmp_path / "dups.csv"
    assert invoke("dedup", root, "--threshold", THRESHOLD, "--report", report).exit_code == 0
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO(report.read_text()))}
    cosines = exact_cosines(root, ORIGINAL)
    for path, reason in EXPECTED.items():
        assert rows[path]["reason"].startswith(reason) and rows[path]["keep"] == "0"
        expected = 1.0 if path.startswith("backup/") else cosines[path]
        assert float(rows[path]["similarity"]) == pytest.approx(expected, abs=1e-4)
    assert rows[ORIGINAL]["keep"] == "1" and rows[ORIGINAL]["similarity"] == "1.0000"
    assert rows[ORIGINAL]["reason"].startswith("highest resolution (640x480), over 1 copy")


def test_html_cards_carry_each_member_reason_and_similarity(root, tmp_path):
    report = tmp_path / "dups.html"
    assert invoke("dedup", root, "--threshold", THRESHOLD, "--report", report).exit_code == 0
    page = html.unescape(report.read_text())
    cosines = exact_cosines(root, ORIGINAL)
    for path in ("web/IMG_1045-small.jpg", "exports/IMG_1045.png", "upscaled/IMG_1045-2x.png"):
        assert f"goes: similarity {cosines[path]:.3f}: {EXPECTED[path]}" in page, path
    assert "goes: similarity 1.000: identical bytes, modified later (" in page
    assert "kept: highest resolution (640x480), over 1 copy; camera original" in page
