"""One path from a file to model-ready pixels: every caller hands the encoder the same pixels."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_photo
from PIL import Image

from dinoseek.indexer import decode
from dinoseek.indexer.decode import load_pixels, read_image
from dinoseek.indexer.library import Library
from dinoseek.indexer.pipeline import Options, run_index
from dinoseek.model import Encoder, InputSpec, preprocess
from dinoseek.model.preprocess import normalize, to_rgb
from dinoseek.retrieval.api import open_library
from dinoseek.retrieval.cli import main
from dinoseek.retrieval.rerank import patch_tokens


# ---- the spec ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "size", "side"), [("crop", 224, 256), ("crop", 448, 256), ("full", 224, 224),
                                                     ("full", 518, 518)])
def test_decode_side(mode, size, side):
    # crop mode resizes the short side to 256 before cropping, whatever the crop; full mode needs its input side
    assert InputSpec(mode, size).decode_side == side


@pytest.mark.parametrize("kwargs", [dict(mode="full", size=100), dict(mode="square", size=224), dict(size=5000)])
def test_spec_is_checked_when_made(kwargs):
    with pytest.raises(ValueError):
        InputSpec(**kwargs)


def test_spec_pixels_are_what_preprocess_normalizes():
    image = synthetic_photo(333, 517, seed=3)
    for spec in (InputSpec("crop", 224), InputSpec("full", 280)):
        pixels = spec.pixels(image)
        assert pixels.shape == (spec.size, spec.size, 3) and pixels.dtype == np.uint8
        assert np.array_equal(normalize(pixels), preprocess(image, mode=spec.mode, size=spec.size)[0].numpy())


def test_one_to_rgb_and_it_scales_16_bit():
    assert decode.to_rgb is to_rgb  # the decoder's and the reference-parity one are the same
    grey16 = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    assert grey16.mode.startswith("I;16")
    scaled = Image.fromarray((np.linspace(0, 255, 64 * 64).reshape(64, 64) + 0.5).astype(np.uint8), "L")
    # The 16-bit image reaches the model as its 8-bit scaling, not clipped to white.
    spec = InputSpec("full", 56)
    assert np.abs(spec.pixels(grey16).astype(int) - spec.pixels(scaled).astype(int)).max() <= 1


def test_load_pixels_decodes_at_the_spec_side(tmp_path):
    path = tmp_path / "big.jpg"
    synthetic_photo(4000, 3000, seed=1).save(path, quality=90)
    for spec in (InputSpec("crop", 224), InputSpec("full", 518)):
        decoded, pixels = load_pixels(path, spec)
        assert min(decoded.image.size) >= spec.decode_side  # the draft never shrinks below what the resize needs
        assert decoded.image.width < 4000  # but it did shrink
        assert decoded.image.size == read_image(path, min_side=spec.decode_side).image.size
        assert pixels.shape == (spec.size, spec.size, 3)


# ---- every caller -----------------------------------------------------------------------------------
def _exif_rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: only an upright read gives the indexed pixels
    synthetic_photo(1200, 700, seed=5).save(path, exif=exif, quality=90)  # large enough to be draft-decoded


def _grey16_png(path):
    Image.fromarray((np.linspace(0, 65535, 300 * 200).reshape(200, 300)).astype(np.uint16)).save(path)


@pytest.mark.parametrize("make", [_exif_rotated_jpeg, _grey16_png])
@pytest.mark.parametrize(("mode", "size"), [("crop", 224), ("full", 112)])
def test_every_caller_hands_the_encoder_the_same_pixels(tiny_folder, tmp_path, monkeypatch, make, mode, size):
    root = tmp_path / "photos"
    root.mkdir()
    path = root / ("photo.jpg" if make is _exif_rotated_jpeg else "photo.png")
    make(path)
    seen: dict[str, list[np.ndarray]] = {}
    caller = ["?"]
    real = Encoder.embed_pixels

    def recording(self, pixels, **kwargs):
        seen.setdefault(caller[0], []).append(pixels.copy())
        return real(self, pixels, **kwargs)

    monkeypatch.setattr(Encoder, "embed_pixels", recording)
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32", mode=mode, size=size)

    caller[0] = "index"
    with Library.open(root, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    caller[0] = "embed"
    result = CliRunner().invoke(main, ["embed", "--weights", str(tiny_folder), "--precision", "fp32", "--mode", mode,
                                       "--size", str(size), str(path)])
    assert result.exit_code == 0, result.output
    caller[0] = "search"
    with open_library(root, weights=tiny_folder, precision="fp32") as lib:
        assert lib.search(path, k=1)[0].score > 0.999
    caller[0] = "crops"
    with Library.open(root) as library:
        ids, _ = library.catalog.vector_sets(("cls",))
        assert list(patch_tokens(library, encoder, ids.tolist())) == ids.tolist()

    assert sorted(seen) == ["crops", "embed", "index", "search"]
    reference = seen["index"][0]
    assert reference.shape == (1, size, size, 3)
    for name, batches in seen.items():
        assert len(batches) == 1 and np.array_equal(batches[0], reference), name


def test_calibrate_embeds_through_the_spec(tiny_folder, tmp_path, monkeypatch):
    from dinoseek.retrieval.calibrate import calibrate

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        synthetic_photo(1600, 1200, seed=i).save(root / f"p{i}.jpg", quality=90)
    encoder = Encoder.from_pretrained(tiny_folder, precision="fp32", mode="full", size=112)
    with Library.open(root, write=True, create=True) as library:
        run_index(library, encoder, Options(workers=0))
    sides, shapes = [], []
    real_read, real_embed = decode.read_image, Encoder.embed_pixels

    def reading(path, *, min_side, **kwargs):
        sides.append(min_side)
        return real_read(path, min_side=min_side, **kwargs)

    def embedding(self, pixels, **kwargs):
        shapes.append(pixels.shape[1:])
        return real_embed(self, pixels, **kwargs)

    monkeypatch.setattr("dinoseek.retrieval.calibrate.read_image", reading)
    monkeypatch.setattr(Encoder, "embed_pixels", embedding)
    with Library.open(root) as library:
        _, _, used = calibrate(library, encoder, sample=3)
    assert used == 3
    # Read at twice the encoder's decode side, so the 50% resize still leaves what the model needs.
    assert sides == [2 * encoder.input_spec.decode_side] * 3
    assert shapes and set(shapes) == {(112, 112, 3)}
