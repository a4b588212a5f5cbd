"""JPEGs decoded in batches (nvjpeg on the GPU) beside the CPU decode workers.

On the CPU the batch decoder is a stand-in written with Pillow (a full decode, as nvjpeg makes it):
the whole mixed pipeline, the device-side geometry, the fallbacks and the rows are checked here.
The `gpu` tests run the same checks with torchvision's nvjpeg on CUDA.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from collection import make_collection
from conftest import synthetic_photo
from PIL import Image

from dinoseek.indexer.catalog import EMBEDDED, ImageRow
from dinoseek.indexer.decode import DecodeError, load_pixels
from dinoseek.indexer.gpu_jpeg import (
    _TRANSPOSES,
    GpuDecodeUnavailableError,
    decode_batch,
    draft_scale,
    jpeg_decoder_for,
    read_jpeg,
)
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, _decode_task, run_index
from dinoseek.indexer.plan import Task
from dinoseek.model import Encoder, InputSpec

# Columns both decoders must fill alike; vectors are compared by cosine.
COLUMNS = ("status", "reason", "sha256", "size", "mtime_ns", "width", "height", "format", "frames", "captured_at",
           "camera")


class PillowBatchDecoder:
    """What nvjpeg returns, made with Pillow: full-size (3, H, W) uint8 as stored, all or nothing."""

    def __init__(self, device: str = "cpu") -> None:
        self.device, self.decoded, self.lock = device, 0, threading.Lock()

    def __call__(self, datas: list[bytes]) -> list[torch.Tensor]:
        out = []
        for data in datas:
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB")).copy()
            out.append(torch.from_numpy(array).permute(2, 0, 1).to(self.device))
        with self.lock:
            self.decoded += len(out)
        return out


@pytest.fixture(scope="module")
def encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32")


def awkward_jpegs(folder) -> list:
    """The JPEGs the GPU path must get right: a 12 MP one, every DCT scale, EXIF rotations, grey,
    progressive, sides not divisible by 8, a thin panorama within limits."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = [("12mp.jpg", 4000, 3000, 1, "RGB", False), ("rot6.jpg", 2049, 1537, 6, "RGB", False),
             ("grey.jpg", 1001, 777, 3, "L", False), ("progressive.jpg", 1203, 901, 8, "RGB", True),
             ("small.jpg", 301, 203, 5, "RGB", False), ("tall.jpg", 523, 2101, 7, "RGB", False),
             ("pano.jpg", 3001, 259, 2, "RGB", False), ("odd.jpg", 517, 263, 4, "RGB", True)]
    paths = []
    for name, w, h, orientation, mode, progressive in cases:
        image = synthetic_photo(w, h, seed=w)
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.convert(mode).save(folder / name, quality=90, exif=exif, progressive=progressive)
        paths.append(folder / name)
    return paths


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def check_agrees_with_cpu_path(paths, decoder, encoder, spec) -> None:
    files = [read_jpeg(p, spec) for p in paths]
    assert all(files), [p.name for p, f in zip(paths, files) if f is None]
    got = decode_batch(files, decoder, spec)
    assert all(g is not None for g in got)
    ref = np.stack([load_pixels(p, spec)[1] for p in paths])
    got = np.stack(got)
    assert got.shape == ref.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0  # levels out of 255
    ours, theirs = encoder.embed_pixels(got), encoder.embed_pixels(ref)
    for kind in ("cls", "patch"):
        assert cosine(getattr(ours, kind), getattr(theirs, kind)).min() >= 0.999, kind


def index(root, encoder, **options):
    options.setdefault("workers", 0)
    with Library.open(root, write=True, create=True) as library:
        return run_index(library, encoder, Options(**options))


def rows(root) -> dict[bytes, ImageRow]:
    with Library.open(root) as library, library.catalog.session() as s:
        return {r.path: r for r in s.query(ImageRow).all()}


def check_same_rows(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for path, row in theirs.items():
        assert {c: getattr(ours[path], c) for c in COLUMNS} == {c: getattr(row, c) for c in COLUMNS}, path
        if row.status == EMBEDDED:
            for kind in ("cls", "patch"):
                a, b = (np.frombuffer(getattr(r, kind), np.float16).astype(np.float32) for r in (ours[path], row))
                assert cosine(a, b) >= 0.999, (path, kind)


def copy_tree(src, dst) -> None:
    import shutil

    shutil.copytree(src, dst, symlinks=True, copy_function=shutil.copy2)


@pytest.fixture
def two_collections(tmp_path):
    """The awkward collection (corrupt, truncated, CMYK, HTML named .jpg, ...) with extra JPEGs, twice."""
    first = tmp_path / "cpu"
    first.mkdir()
    expected = make_collection(first)
    awkward_jpegs(first / "awkward")
    second = tmp_path / "gpu"
    copy_tree(first, second)
    return first, second, expected


def test_draft_scale_is_pillows_choice(tmp_path):
    for w, h, side in ((4000, 3000, 256), (2049, 1537, 256), (511, 4000, 256), (300, 200, 256), (4000, 3000, 448),
                       (2048, 2048, 256), (2047, 2048, 256)):
        path = tmp_path / f"{w}x{h}.jpg"
        Image.new("RGB", (w, h)).save(path)
        with Image.open(path) as image:
            image.draft("RGB", (side, side))
            scale = draft_scale(w, h, side)
            assert image.size == (-(-w // scale), -(-h // scale)), (w, h, side)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_orientations_are_pillows_exif_transposes(orientation):
    from PIL import ImageOps

    array = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(array)
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = _TRANSPOSES[orientation](torch.from_numpy(array).permute(2, 0, 1)).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("spec", [InputSpec("crop", 224), InputSpec("full", 252), InputSpec("crop", 280)],
                         ids=["crop224", "full252", "crop280"])
def test_device_geometry_agrees_with_the_cpu_draft_path(tmp_path, tiny_folder, spec):
    """Pillow's full decode, then the GPU path's geometry (run on the CPU): the CPU path's pixels
    to under a level on average, its vectors to cosine >= 0.999."""
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32", mode=spec.mode, size=spec.size)
    check_agrees_with_cpu_path(awkward_jpegs(tmp_path / "photos"), PillowBatchDecoder(), encoder, spec)


def one_camera_jpegs(folder) -> list:
    """A camera's photos: one sensor size in several orientations, plus a photo of another size."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (w, h, orientation) in enumerate([(1600, 1200, 1), (1600, 1200, 6), (1600, 1200, 1), (1600, 1200, 3),
                                             (1600, 1200, 8), (1200, 1600, 1), (1001, 777, 1)]):
        exif = Image.Exif()
        exif[0x0112] = orientation
        synthetic_photo(w, h, seed=k).save(folder / f"{k}.jpg", quality=90, exif=exif)
        paths.append(folder / f"{k}.jpg")
    return paths


def check_grouped_as_each_alone(paths, decoder, spec, monkeypatch) -> None:
    """decode_batch resizes the images of one reduced size together: one geometry call per size,
    and the very pixels each image gets alone."""
    import dinoseek.indexer.gpu_jpeg as gpu_jpeg

    files = [read_jpeg(p, spec) for p in paths]
    alone = [decode_batch([f], decoder, spec)[0] for f in files]  # a batch of one: nothing to group with
    batches = []
    real_geometry = gpu_jpeg._geometry
    monkeypatch.setattr(gpu_jpeg, "_geometry", lambda x, spec: batches.append(len(x)) or real_geometry(x, spec))
    got = decode_batch(files, decoder, spec)
    assert sorted(batches) == [1, 3, 3]  # upright and upside down; turned either way (and the portrait); the other
    for name, ours, theirs in zip([p.name for p in paths], got, alone):
        assert np.array_equal(ours, theirs), name


@pytest.mark.parametrize("spec", [InputSpec("crop", 224), InputSpec("full", 252), InputSpec("crop", 320)],
                         ids=["crop224", "full252", "crop320"])
def test_photos_of_one_size_are_resized_together_as_each_alone(tmp_path, monkeypatch, spec):
    check_grouped_as_each_alone(one_camera_jpegs(tmp_path), PillowBatchDecoder(), spec, monkeypatch)


def test_index_benchmark_times_the_lane_stage_by_stage(tmp_path):
    """benchmarks/index.py's lane breakdown, run with the Pillow stand-in (on an H200 it runs nvjpeg)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    try:
        from index import _lane_stages
    finally:
        sys.path.pop(0)
    paths = one_camera_jpegs(tmp_path)
    decoder = PillowBatchDecoder()
    stages = _lane_stages(paths, InputSpec(), decoder, 3)
    assert set(stages) == {"read", "nvjpeg", "decode_batch", "pipelined"} and min(stages.values()) > 0
    assert decoder.decoded == 3 * len(paths)  # decoder alone, decode_batch, pipelined: every file each time


def test_read_jpeg_meta_is_the_cpu_paths(tmp_path):
    from collection import _exif_rotated

    _exif_rotated(tmp_path / "r.jpg", 6)
    spec = InputSpec()
    file = read_jpeg(tmp_path / "r.jpg", spec)
    reference = _decode_task(os.fsencode(tmp_path), Task(b"r.jpg", 0, 0), spec, frozenset())
    assert file.meta == reference.meta and file.orientation == 6 and file.scale == 1


def test_files_the_gpu_path_cannot_take_go_back_to_the_cpu(tmp_path):
    spec = InputSpec()
    synthetic_photo(400, 300).convert("CMYK").save(tmp_path / "cmyk.jpg")
    data = (tmp_path / "cmyk.jpg").read_bytes()
    synthetic_photo(400, 300).save(tmp_path / "ok.jpg")
    good = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "trailer.jpg").write_bytes(good + b"motion photo video follows")
    (tmp_path / "page.jpg").write_text("<html>404</html>")
    synthetic_photo(400, 300).save(tmp_path / "png.jpg", "PNG")
    synthetic_photo(8000, 300).save(tmp_path / "strip.jpg")  # wider than MAX_ASPECT: limit_aspect crops it
    for name in ("cmyk.jpg", "truncated.jpg", "trailer.jpg", "page.jpg", "png.jpg", "strip.jpg"):
        assert read_jpeg(tmp_path / name, spec) is None, name
    assert read_jpeg(tmp_path / "ok.jpg", spec) is not None and data
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DecodeError) as info:  # recorded as read_image records it, without a decode
        read_jpeg(tmp_path / "empty.jpg", spec)
    assert info.value.status == "empty"


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_pipeline_gives_the_rows_of_a_cpu_only_run(two_collections, encoder, workers):
    cpu_root, gpu_root, expected = two_collections
    index(cpu_root, encoder, workers=workers, decode="cpu")
    decoder = PillowBatchDecoder()
    counts = index(gpu_root, encoder, workers=workers, jpeg_decoder=decoder, gpu_batch=3)
    assert decoder.decoded > 0  # the batch decoder took part
    check_same_rows(rows(gpu_root), rows(cpu_root))
    catalog = rows(gpu_root)
    assert catalog[b"broken/truncated.jpg"].status == "truncated"
    assert catalog[b"broken/page.jpg"].status == "unidentified"
    assert catalog[b"broken/empty.jpg"].status == "empty"
    assert catalog[b"print/cmyk.jpg"].status == EMBEDDED
    assert counts["embedded"] == sum(s == "ok" for s in expected.values()) + 8


def test_decoder_errors_fall_back_to_the_cpu_path(two_collections, encoder):
    cpu_root, gpu_root, _ = two_collections
    index(cpu_root, encoder, decode="cpu")

    def refuses_progressive(datas):  # like a decoder that cannot take some files
        if any(b"\xff\xc2" in d[:4096] for d in datas):
            raise RuntimeError("Error while decoding JPEG images: unsupported")
        return PillowBatchDecoder()(datas)

    index(gpu_root, encoder, jpeg_decoder=refuses_progressive, gpu_batch=4)
    check_same_rows(rows(gpu_root), rows(cpu_root))


def test_a_crashing_batch_goes_to_the_cpu_and_the_lane_stops(two_collections, encoder, caplog):
    cpu_root, gpu_root, _ = two_collections
    index(cpu_root, encoder, decode="cpu")

    def broken(datas):  # returns garbage: the batch itself fails, not one file
        return ["not a tensor"] * len(datas)

    with caplog.at_level("WARNING", logger="dinoseek.indexer.pipeline"):
        index(gpu_root, encoder, jpeg_decoder=broken, gpu_batch=2, workers=2)
    check_same_rows(rows(gpu_root), rows(cpu_root))
    assert "GPU JPEG decoding stopped" in caplog.text


def test_a_hung_decoder_hands_its_files_to_the_cpu(tmp_path, encoder):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        synthetic_photo(320, 240, seed=i).save(root / f"p{i}.jpg")
    release = threading.Event()

    def hangs(datas):
        release.wait(30)
        return PillowBatchDecoder()(datas)

    started = time.monotonic()
    try:
        counts = index(root, encoder, jpeg_decoder=hangs, decode_timeout=1.0)
    finally:
        release.set()
    assert counts["embedded"] == 6 and counts["failed"] == 0
    assert time.monotonic() - started < 20


def test_moved_files_are_still_matched(tmp_path, encoder):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):
        synthetic_photo(300, 200, seed=i).save(root / f"p{i}.jpg")
    index(root, encoder, jpeg_decoder=PillowBatchDecoder())
    before = rows(root)
    os.rename(root / "p1.jpg", root / "renamed.jpg")
    counts = index(root, encoder, jpeg_decoder=PillowBatchDecoder())
    assert counts["moved"] == 1 and counts["embedded"] == 0 and counts["deleted"] == 0
    assert rows(root)[b"renamed.jpg"].id == before[b"p1.jpg"].id


def lane_run(root, count: int, workers: int, decoder, gpu_batch: int = 2):
    """`count` small JPEGs in `root`, and the decode results of a run over them (a generator)."""
    from dinoseek.indexer.pipeline import _decoded

    root.mkdir()
    for i in range(count):
        synthetic_photo(160, 120, seed=i).save(root / f"p{i}.jpg")
    tasks = [Task(f"p{i}.jpg".encode(), 0, 0) for i in range(count)]
    embedder = type("DecodeOnly", (), {"input_spec": InputSpec()})()
    options = Options(workers=workers, jpeg_decoder=decoder, gpu_batch=gpu_batch)
    return tasks, _decoded(os.fsencode(root), tasks, embedder, options, frozenset())


def decoded_while_paused(decoder, settle: float = 0.5, limit: float = 20) -> int:
    """How many files the decoder has decoded once it stops for `settle` seconds (the run pauses)."""
    last, since, give_up = -1, time.monotonic(), time.monotonic() + limit
    while time.monotonic() < give_up and (decoder.decoded != last or time.monotonic() - since < settle):
        if decoder.decoded != last:
            last, since = decoder.decoded, time.monotonic()
        time.sleep(0.02)
    return decoder.decoded


def check_every_task_once(tasks, results) -> None:
    assert sorted(r.task.rel for r in results) == sorted(t.rel for t in tasks)
    assert all(r.pixels is not None for r in results)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_lane_decodes_on_while_the_run_is_busy_elsewhere(tmp_path, workers):
    """The run stops taking results while it embeds and commits a batch; the GPU lane goes on
    reading and decoding meanwhile, instead of waiting to be fed."""
    decoder = PillowBatchDecoder()
    tasks, results = lane_run(tmp_path / "photos", 8, workers, decoder)
    first = next(results)
    assert decoded_while_paused(decoder) == 8  # every batch, while the run took nothing
    check_every_task_once(tasks, [first, *results])


def test_results_waiting_for_the_run_are_bounded(tmp_path):
    """...but not without end: once 4 batches of results wait, the lane stops reading and decoding
    until the run takes them (each holds its pixels), then goes on."""
    decoder = PillowBatchDecoder()
    tasks, results = lane_run(tmp_path / "photos", 40, 0, decoder)
    first = next(results)
    paused = decoded_while_paused(decoder)
    assert 8 <= paused <= 8 + 2 * 2 + 2  # 4 batches waiting, 2 decoding, the first taken
    check_every_task_once(tasks, [first, *results])
    assert decoder.decoded > paused  # and it went on (the CPU path, idle then, took JPEGs too)


def test_lane_logs_where_its_time_went(tmp_path, encoder, caplog):
    import re

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):
        synthetic_photo(640, 480, seed=i).save(root / f"p{i}.jpg")
    decoder = PillowBatchDecoder()
    with caplog.at_level("INFO", logger="dinoseek.indexer.pipeline"):
        counts = index(root, encoder, jpeg_decoder=decoder, gpu_batch=2)
    assert counts["embedded"] == 5 and decoder.decoded == 5
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GPU JPEG decoding:")]
    found = re.fullmatch(r"GPU JPEG decoding: 5 files in 3 batches \((\d) short\) over ([\d.]+) s; decoding thread "
                         r"busy (\d+)% \(decoder ([\d.]+) s, reduction and copy back ([\d.]+) s\); reads "
                         r"([\d.]+) ms a file in \d threads", line)
    assert found, line
    short, seconds, busy, in_decoder, reducing, read_ms = (float(g) for g in found.groups())
    assert 1 <= short <= 3 and busy <= 100 and read_ms > 0
    assert in_decoder + reducing <= seconds + 0.2  # one decoding thread, within the lane's life (rounded)


def test_auto_uses_the_cpu_where_the_gpu_cannot_decode(caplog, monkeypatch):
    import dinoseek.indexer.gpu_jpeg as gpu_jpeg

    with caplog.at_level("INFO", logger="dinoseek.indexer.gpu_jpeg"):
        assert jpeg_decoder_for("cpu", "cpu") is None
        assert jpeg_decoder_for("auto", "cpu") is None
        assert not caplog.records  # an encoder on the CPU: nothing to explain
        monkeypatch.setattr(gpu_jpeg, "gpu_decode_problem", lambda device: "torchvision is not usable (no module)")
        assert jpeg_decoder_for("auto", "cuda") is None
    said = [r.getMessage() for r in caplog.records]
    assert said == ["JPEGs decoded on the CPU: torchvision is not usable (no module)"]
    with pytest.raises(ValueError):
        jpeg_decoder_for("fast", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_decode_gpu_without_cuda_is_a_one_line_error(tmp_path, tiny_folder, encoder):
    from click.testing import CliRunner

    from dinoseek.retrieval.cli import main

    with pytest.raises(GpuDecodeUnavailableError, match="cannot decode JPEGs on the GPU: the encoder runs on cpu"):
        jpeg_decoder_for("gpu", "cpu")
    synthetic_photo(100, 80).save(tmp_path / "a.jpg")
    result = CliRunner().invoke(main, ["index", str(tmp_path), "--weights", str(tiny_folder), "--precision", "fp32",
                                       "--workers", "0", "--decode", "gpu"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot decode JPEGs on the GPU: ") and result.output.count("\n") == 1
    assert not (tmp_path / ".dinoseek").exists()  # refused before a library was made
    with pytest.raises(GpuDecodeUnavailableError):
        index(tmp_path, encoder, decode="gpu")
    ok = CliRunner().invoke(main, ["index", str(tmp_path), "--weights", str(tiny_folder), "--precision", "fp32",
                                   "--workers", "0", "--decode", "auto"])
    assert ok.exit_code == 0, ok.output


def test_nvjpeg_gets_the_files_bytes_uncopied(tmp_path, monkeypatch):
    """What the nvjpeg wrapper hands torchvision (faked here): each file's bytes as a 1-D uint8
    tensor over the bytes themselves (no copy per file), RGB, onto the encoder's device; silently
    (torch warns about read-only buffers once a process, so this checks only a first call)."""
    import types
    import warnings

    from dinoseek.indexer.gpu_jpeg import nvjpeg_decoder

    calls = []
    def decode_jpeg(inputs, mode, device):
        calls.append((inputs, mode, device))
        return []

    io_module = types.SimpleNamespace(ImageReadMode=types.SimpleNamespace(RGB="RGB"), decode_jpeg=decode_jpeg)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=io_module))
    monkeypatch.setitem(sys.modules, "torchvision.io", io_module)
    datas = [b"\xff\xd8\xff" + bytes(range(200)), b"\xff\xd8\xff" * 50]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nvjpeg_decoder(torch.device("cpu"))(datas)
    ((inputs, mode, device),) = calls
    assert (mode, device) == ("RGB", torch.device("cpu"))
    for tensor, data in zip(inputs, datas):
        assert tensor.dtype == torch.uint8 and tensor.ndim == 1 and bytes(tensor.numpy()) == data
        assert tensor.data_ptr() == np.frombuffer(data, np.uint8).ctypes.data  # the bytes object's own buffer


def test_importing_the_project_never_needs_torchvision():
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import dinoseek.indexer.pipeline, dinoseek.indexer.gpu_jpeg, dinoseek.retrieval.cli\n"
            "from dinoseek.indexer.gpu_jpeg import gpu_decode_problem\n"
            "print(gpu_decode_problem('cpu'))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not on a CUDA GPU" in out.stdout


# --- on a CUDA machine: torchvision's nvjpeg ---------------------------------------------------


@pytest.fixture(scope="module")
def cuda_encoder(tiny_folder):
    return Encoder.from_pretrained(tiny_folder, precision="fp32", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", [InputSpec("crop", 224), InputSpec("full", 252)], ids=["crop224", "full252"])
def test_nvjpeg_vectors_agree_with_the_cpu_path(tmp_path, tiny_folder, spec):
    from dinoseek.indexer.gpu_jpeg import gpu_decode_problem, nvjpeg_decoder

    assert gpu_decode_problem("cuda") is None
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32", device="cuda", mode=spec.mode, size=spec.size)
    check_agrees_with_cpu_path(awkward_jpegs(tmp_path / "photos"), nvjpeg_decoder(torch.device("cuda")), encoder,
                               spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_photos_of_one_size_are_resized_together_as_each_alone_on_cuda(tmp_path, monkeypatch):
    from dinoseek.indexer.gpu_jpeg import nvjpeg_decoder

    check_grouped_as_each_alone(one_camera_jpegs(tmp_path), nvjpeg_decoder(torch.device("cuda")), InputSpec(),
                                monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_library_with_decode_gpu_has_the_rows_of_decode_cpu(two_collections, cuda_encoder):
    cpu_root, gpu_root, _ = two_collections
    index(cpu_root, cuda_encoder, workers=2, decode="cpu")
    counts = index(gpu_root, cuda_encoder, workers=2, decode="gpu", gpu_batch=4)
    check_same_rows(rows(gpu_root), rows(cpu_root))
    catalog = rows(gpu_root)
    assert catalog[b"broken/truncated.jpg"].status == "truncated"  # fell back, recorded as today
    assert counts["embedded"] == sum(r.status == EMBEDDED for r in catalog.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_corrupt_jpeg_falls_back_from_nvjpeg(tmp_path):
    from dinoseek.indexer.gpu_jpeg import nvjpeg_decoder

    spec = InputSpec()
    synthetic_photo(640, 480).save(tmp_path / "ok.jpg", quality=90)
    data = bytearray((tmp_path / "ok.jpg").read_bytes())
    start = data.index(b"\xff\xda")  # start of scan: garble the entropy-coded data after it
    data[start + 40: start + 400] = bytes(range(256)) + bytes(104)
    (tmp_path / "garbled.jpg").write_bytes(bytes(data))
    files = [read_jpeg(tmp_path / n, spec) for n in ("ok.jpg", "garbled.jpg")]
    got = decode_batch(files, nvjpeg_decoder(torch.device("cuda")), spec)
    assert got[0] is not None  # the good file survives its batch neighbour's failure either way
