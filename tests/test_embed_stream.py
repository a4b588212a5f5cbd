"""`dinoseek embed` at scale: folders and lists in, a batch at a time through the indexer's decoder,
JSON Lines or a growing .npy folder out, memory flat, and the vector `index` and `search` use."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo
from PIL import Image

from dinoseek.indexer.decode import load_pixels
from dinoseek.model import Encoder
from dinoseek.retrieval.cli import main
from dinoseek.retrieval.embed import Embedded, VectorFolder, embed_paths, image_paths, read_path_list

CHILD = [sys.executable, "-c", "from dinoseek.retrieval.entry import run; run()"]


@pytest.fixture(autouse=True)
def no_progress_lines(monkeypatch):
    """stderr is asserted line by line here; progress lines (after 1 s on a slow machine) would interleave."""
    monkeypatch.setenv("DINOSEEK_PROGRESS", "off")


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def collection(tmp_path) -> Path:
    """Photos the indexer turns into RGB in its own ways (CMYK, 16-bit, palette with alpha), a nested
    folder, a hidden one, a non-image, a PSD and an HTML page named .jpg."""
    root = tmp_path / "photos"
    (root / "trip" / "day1").mkdir(parents=True)
    (root / ".thumbs").mkdir()
    synthetic_photo(320, 240, seed=1).save(root / "a.jpg", quality=90)
    synthetic_photo(300, 260, seed=2).convert("CMYK").save(root / "trip" / "cmyk.jpg", quality=90)
    grey16 = (np.asarray(synthetic_photo(280, 250, seed=3).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(root / "trip" / "day1" / "grey16.png")
    synthetic_photo(260, 260, seed=4).convert("RGBA").quantize(64).save(root / "trip" / "palette.png")
    synthetic_photo(200, 200, seed=5).save(root / ".thumbs" / "hidden.jpg")
    (root / "notes.txt").write_text("not a photo")
    (root / "layers.psd").write_bytes(b"8BPS" + bytes(30))
    (root / "page.jpg").write_text("<html>not a photo</html>")
    return root


# ---- inputs ----------------------------------------------------------------------------------------
def test_folders_are_walked_with_the_indexers_rules(collection, tiny_folder):
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", "--json", collection)
    assert result.exit_code == 0, result.output
    rows = {os.path.relpath(r["path"], collection): r for r in json_lines(result.stdout)}
    embedded = sorted(p for p, r in rows.items() if "cls" in r)
    assert embedded == ["a.jpg", "trip/cmyk.jpg", "trip/day1/grey16.png", "trip/palette.png"]  # hidden, .txt: not images
    assert rows["layers.psd"]["status"] == "unsupported"  # refused by extension, as index refuses it
    assert rows["page.jpg"]["status"] == "unidentified" and rows["page.jpg"]["error"]


def test_cmyk_16_bit_and_palette_files_get_the_vector_of_the_indexers_decoder(collection, tiny_folder, encoder):
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", "--json", collection / "trip")
    assert result.exit_code == 0, result.output
    rows = json_lines(result.stdout)
    assert len(rows) == 3
    for row in rows:
        pixels = load_pixels(row["path"], encoder.input_spec)[1]
        reference = encoder.embed_pixels(np.stack([pixels]))
        assert cosine(row["cls"], reference.cls[0]) > 0.9999 and cosine(row["patch"], reference.patch[0]) > 0.9999
    grey = next(r for r in rows if r["path"].endswith("grey16.png"))
    white = encoder.embed_pixels(np.full((1, 224, 224, 3), 255, np.uint8)).cls[0]
    assert cosine(grey["cls"], white) < 0.99  # 16-bit scaled, not clipped to white


def test_from_file_reads_one_path_per_line_and_walks_folders_in_it(collection, tiny_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"%s\r\n\n%s\n%s\n" % (bytes(collection / "a.jpg"), bytes(collection / "trip" / "day1"),
                                             bytes(tmp_path / "gone.jpg")))
    result = invoke("embed", "--weights", tiny_folder, "--json", "--from-file", listing, collection / "page.jpg")
    assert result.exit_code == 0, result.output
    rows = json_lines(result.stdout)
    # arguments first, then the list in its order; a missing file is skipped like an unreadable one
    assert [Path(r["path"]).name for r in rows] == ["page.jpg", "a.jpg", "grey16.png", "gone.jpg"]
    assert rows[3]["status"] == "unreadable" and "No such file" in rows[3]["error"]


def test_from_stdin_with_nul_separated_names(collection, tiny_folder, tmp_path):
    odd = tmp_path / "line\nbreak.jpg"
    odd.write_bytes((collection / "a.jpg").read_bytes())
    stdin = b"\0".join([bytes(odd), bytes(collection / "a.jpg"), b""])
    result = invoke("embed", "--weights", tiny_folder, "--json", "--from-file", "-", "-0", input=stdin)
    assert result.exit_code == 0, result.output
    rows = json_lines(result.stdout)
    assert [r["path"] for r in rows] == [str(odd), str(collection / "a.jpg")]
    assert cosine(rows[0]["cls"], rows[1]["cls"]) > 0.9999


def test_path_lists_keep_any_name_and_drop_empty_entries():
    undecodable = b"/photos/caf\xe9.jpg"
    assert list(read_path_list(io.BytesIO(b"a.jpg\r\n\n%s\nlast.jpg" % undecodable))) == [
        b"a.jpg", undecodable, b"last.jpg"]
    assert list(read_path_list(io.BytesIO(b"x\ny.jpg\0\0z.jpg"), null=True)) == [b"x\ny.jpg", b"z.jpg"]


def test_undecodable_file_names_round_trip_through_json(tmp_path, tiny_folder):
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(raw, "wb") as f:
        synthetic_photo(200, 150).save(f, "JPEG")
    result = invoke("embed", "--weights", tiny_folder, "--json", tmp_path)
    assert result.exit_code == 0, result.output
    assert os.fsencode(json_lines(result.stdout)[0]["path"]) == raw


def test_no_inputs_is_a_usage_error(tiny_folder):
    result = invoke("embed", "--weights", tiny_folder)
    assert result.exit_code == 2 and "Error: give IMAGES (files or folders) or --from-file LIST" in result.output


# ---- bad files --------------------------------------------------------------------------------------
def test_bad_files_are_skipped_with_one_escaped_line_each_and_counted(collection, tiny_folder):
    forged = collection / "evil\x1b[2J\nname.jpg"
    forged.write_bytes(b"\xff\xd8\xff garbage")
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", collection / "a.jpg", forged,
                    collection / "page.jpg")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 and result.stdout.startswith(f"{collection / 'a.jpg'}\tdim=128")
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"skipped {collection}/evil\\x1b[2J\\x0aname.jpg: ")
    assert lines[1] == f"skipped {collection / 'page.jpg'}: not an image Pillow recognises"
    assert lines[2] == "1 embedded (dim 128, fp32), 2 skipped"
    assert len(lines) == 3 and "\x1b" not in result.output


def test_nothing_embedded_exits_1(collection, tiny_folder, tmp_path):
    result = invoke("embed", "--weights", tiny_folder, collection / "page.jpg")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"skipped {collection / 'page.jpg'}: not an image Pillow recognises",
                                          "Error: nothing embedded: 1 file(s) skipped (see above)"]
    (tmp_path / "empty").mkdir()
    result = invoke("embed", "--weights", tiny_folder, tmp_path / "empty")
    assert result.exit_code == 1 and result.stderr.startswith("Error: no image files found")


# ---- output ---------------------------------------------------------------------------------------
def test_out_folder_holds_the_json_vectors_row_for_row(collection, tiny_folder, tmp_path):
    out = tmp_path / "vectors"
    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", "--out", out, "--json",
                    "--batch-size", 2, collection)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == f"4 embedded (dim 128, fp32), 2 skipped; written to {out}"
    rows = [r for r in json_lines(result.stdout) if "cls" in r]
    paths = [json.loads(line)["path"] for line in (out / "paths.jsonl").read_text().splitlines()]
    cls, patch = np.load(out / "cls.npy"), np.load(out / "patch.npy", mmap_mode="r")
    assert paths == [r["path"] for r in rows] and cls.shape == patch.shape == (4, 128) and cls.dtype == np.float32
    np.testing.assert_allclose(cls, [r["cls"] for r in rows], atol=1e-6)
    np.testing.assert_allclose(patch, [r["patch"] for r in rows], atol=1e-6)


def test_out_folder_is_a_valid_npy_after_every_batch(collection, encoder, tmp_path):
    out = tmp_path / "vectors"
    with VectorFolder(out, encoder.dim) as folder:
        seen = []
        for batch in embed_paths(image_paths([collection]), encoder, batch_size=2):
            folder.append(batch)
            seen += [r for r in batch if isinstance(r, Embedded)]
            # read by another reader while the run goes on: exactly the rows written so far
            cls = np.load(out / "cls.npy", mmap_mode="r")
            assert cls.shape == (len(seen), encoder.dim)
            np.testing.assert_array_equal(cls[-1], seen[-1].cls)
            assert len((out / "paths.jsonl").read_text().splitlines()) == len(seen)
    assert len(seen) == 4


def test_out_never_overwrites_and_refuses_npz_names(collection, tiny_folder, tmp_path):
    out = tmp_path / "vectors"
    out.mkdir()
    (out / "cls.npy").write_bytes(b"earlier results")
    result = invoke("embed", "--weights", tiny_folder, "--out", out, collection / "a.jpg")
    assert result.exit_code == 1 and result.output.startswith(f"Error: --out {out} already holds cls.npy;")
    assert (out / "cls.npy").read_bytes() == b"earlier results"
    result = invoke("embed", "--weights", tiny_folder, "--out", tmp_path / "v.npz", collection / "a.jpg")
    assert result.exit_code == 1 and "--out must be a folder" in result.output
    assert not (tmp_path / "v.npz").exists()


def test_out_of_a_run_that_embedded_nothing_is_removed(collection, tiny_folder, tmp_path):
    out = tmp_path / "vectors"
    result = invoke("embed", "--weights", tiny_folder, "--out", out, collection / "page.jpg")
    assert result.exit_code == 1 and not out.exists()  # the same --out works on the next try


def test_json_lines_come_out_per_batch_while_the_list_is_still_being_written(collection, tiny_folder):
    """stdin stays open: the first batch must be embedded and printed before the list ends."""
    child = subprocess.Popen([*CHILD, "embed", "--weights", str(tiny_folder), "--json", "--batch-size", "2",
                              "--from-file", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env={**os.environ, "DINOSEEK_PROGRESS": "off"})
    try:
        child.stdin.write(b"%s\n%s\n" % (bytes(collection / "a.jpg"), bytes(collection / "page.jpg")))
        child.stdin.flush()
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready, "no output while the list was open"
        first = json.loads(child.stdout.readline())
        second = json.loads(child.stdout.readline())
        assert first["path"].endswith("a.jpg") and "cls" in first and second["status"] == "unidentified"
        child.stdin.write(bytes(collection / "trip" / "cmyk.jpg") + b"\n")
        child.stdin.close()
        rest = child.stdout.read().decode().splitlines()
        assert child.wait(60) == 0 and len(rest) == 1 and json.loads(rest[0])["path"].endswith("cmyk.jpg")
    finally:
        child.kill()
        child.wait()


# ---- memory --------------------------------------------------------------------------------------------
def _wide_checkpoint(folder: Path, hidden: int, layers: int = 1) -> Path:
    """Random DINOv2 weights whose width sets the vector size (the cost of holding every vector)."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=1, image_size=14,
                             patch_size=14, mlp_ratio=1)).eval().save_pretrained(folder)
    return folder


def _tiny_pngs(folder: Path, count: int) -> None:
    """`count` small PNG files in subfolders of 500 (decoded by the real decoder, cheap to write)."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    for i in range(count):
        sub = folder / f"{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.png").write_bytes(blobs[i % len(blobs)])


# The child reports its own peak: VmHWM belongs to the process image after exec. (wait4's ru_maxrss
# would not do: Linux carries the pre-exec peak over exec, so every child "peaks" at pytest's size.)
_MEASURED_CHILD = [sys.executable, "-c", """
import atexit, re, sys
report = sys.argv.pop(1)
def peak():
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
atexit.register(peak)
from dinoseek.retrieval.entry import run
run()
"""]


def _peak_rss_mb(args: list[str], report: Path) -> float:
    """Run `dinoseek ARGS` in a child; its peak resident memory in MB."""
    child = subprocess.run([*_MEASURED_CHILD, str(report), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env={**os.environ, "DINOSEEK_PROGRESS": "off", **_STEADY_MALLOC}, check=False)
    assert child.returncode == 0, child.stderr.decode()
    return int(report.read_text()) / 1024


# Measured growth: about 1 MB in both cases below. The children run with a fixed glibc mmap
# threshold: by default glibc raises it after the first large free, and batch-sized buffers then
# land in the heap where fragmentation moves the peak by +-20 MB from run to run (noise, not growth).
GROWTH_BOUND_MB = 10
_STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from /proc (Linux)")
@pytest.mark.parametrize("case", ["vectors", "pixels"])
def test_memory_stays_flat_as_the_file_count_grows(case, tmp_path):
    """Peak RSS for a few files vs thousands differs by less than GROWTH_BOUND_MB, while holding
    what a non-streaming embed holds would cost at least twice that:
    - "vectors": 1536-d vectors (a one-block model, one patch per image), --out: the cls + patch
      rows of 2,500 - 128 images are 2372 x 2 x 1536 x 4 B = 28 MB;
    - "pixels": the default 224 px crop, --json: 400 - 64 images decoded up front are 336 x 150 kB = 48 MB.
    The small run has two full batches, so both runs hold the same batch-sized buffers."""
    if case == "vectors":
        weights, dim, pixel_bytes, small, large = _wide_checkpoint(tmp_path / "w", 1536), 1536, 14 * 14 * 3, 128, 2500
        options = ["--mode", "full", "--size", "14", "--batch-size", "64"]
    else:
        weights, dim, pixel_bytes, small, large = _wide_checkpoint(tmp_path / "w", 32), 32, 224 * 224 * 3, 64, 400
        options = ["--batch-size", "32"]
    accumulated_mb = (large - small) * (2 * dim * 4 + pixel_bytes) / 2**20
    assert accumulated_mb > 2 * GROWTH_BOUND_MB  # the test can tell streaming from accumulating
    peaks = []
    for count in (small, large):
        _tiny_pngs(tmp_path / f"n{count}", count)
        output = ["--out", str(tmp_path / f"out{count}")] if case == "vectors" else ["--json"]
        peaks.append(_peak_rss_mb(["embed", "--weights", str(weights), "--precision", "fp32", *options, *output,
                                   str(tmp_path / f"n{count}")], tmp_path / f"peak{count}"))
    if case == "vectors":
        assert np.load(tmp_path / f"out{large}" / "cls.npy", mmap_mode="r").shape == (large, dim)
    assert peaks[1] - peaks[0] < GROWTH_BOUND_MB, (peaks, accumulated_mb)


# ---- one file, one vector: embed, index, search --------------------------------------------------------
def test_embed_index_and_search_agree_on_an_exif_rotated_jpeg(tiny_folder, tmp_path):
    from dinoseek.retrieval.api import open_library
    from test_retrieval import index_with_cli

    root = tmp_path / "photos"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    turned = root / "turned.jpg"
    synthetic_photo(1200, 700, seed=5).save(turned, exif=exif, quality=90)  # large enough to be draft-decoded
    synthetic_photo(900, 600, seed=6).save(root / "other.jpg", quality=90)
    index_with_cli(root, tiny_folder)

    result = invoke("embed", "--weights", tiny_folder, "--precision", "fp32", "--json", turned)
    assert result.exit_code == 0, result.output
    embedded = json_lines(result.stdout)[0]
    searched = invoke("search", turned, "--root", root, "--weights", tiny_folder, "--precision", "fp32", "--json")
    assert searched.exit_code == 0, searched.output
    best = json.loads(searched.stdout)[0]
    assert best["path"] == "turned.jpg" and best["score"] >= 0.9999
    with open_library(root, weights=tiny_folder, precision="fp32") as lib:
        for kind in ("cls", "patch"):
            _, stored = lib.row_vector("turned.jpg", kind)  # what index wrote to the catalog
            query = lib.vectors_for(turned, kind)[0]  # what search embeds for the file
            assert cosine(embedded[kind], stored) >= 0.9999, kind
            assert cosine(embedded[kind], query) >= 0.9999, kind
        # ...and the orientation was applied, not ignored by all three alike
        encoder = lib.encoder
        sideways = encoder.embed_pixels(np.stack([encoder.input_spec.pixels(Image.open(turned).convert("RGB"))]))
        assert cosine(embedded["cls"], sideways.cls[0]) < 0.99
