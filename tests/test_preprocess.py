"""Preprocessing equals the reference image processor (transformers, PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_photo
from PIL import Image

from dinoseek.model import preprocess
from dinoseek.model.preprocess import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def reference():
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    # The facebook/dinov2-* preprocessor_config.json values.
    return BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def odd_inputs() -> dict[str, Image.Image]:
    photo = synthetic_photo(333, 517, seed=3)
    rgba = synthetic_photo(401, 300, seed=4).convert("RGBA")
    alpha = np.zeros((300, 401), np.uint8)
    alpha[50:250, 100:300] = 255
    alpha[:, :40] = 128
    rgba.putalpha(Image.fromarray(alpha))
    palette = synthetic_photo(260, 300, seed=5).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    return {
        "rgb-portrait": photo,
        "rgb-landscape-wide": synthetic_photo(1024, 229, seed=1),
        "rgb-tiny": synthetic_photo(97, 61, seed=2),
        "rgb-exact-256": synthetic_photo(256, 256, seed=6),
        "grey": photo.convert("L"),
        "rgba": rgba,
        "la": rgba.convert("LA"),
        "cmyk": photo.convert("CMYK"),
        "palette-transparent": palette,
    }


@pytest.mark.parametrize("name", list(odd_inputs()))
def test_crop_mode_equals_reference(reference, name):
    image = odd_inputs()[name]
    expected = torch.from_numpy(np.asarray(reference(images=image, return_tensors="np")["pixel_values"]))
    ours = preprocess(image)
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= 1e-5


def test_batch_of_images(reference):
    images = list(odd_inputs().values())
    expected = np.asarray(reference(images=images, return_tensors="np")["pixel_values"])
    assert np.abs(preprocess(images).numpy() - expected).max() <= 1e-5


def test_full_mode_keeps_whole_frame():
    image = synthetic_photo(640, 200, seed=0)
    pixels = preprocess(image, mode="full", size=280)
    assert pixels.shape == (1, 3, 280, 280)
    # The leftmost column of the photo survives (a center crop would have cut it off).
    left_strip = preprocess(image.crop((0, 0, 64, 200)), mode="full", size=28)
    assert left_strip.shape == (1, 3, 28, 28)
    squeezed = image.resize((280, 280), Image.Resampling.BICUBIC)
    expected = (np.asarray(squeezed, np.float32).transpose(2, 0, 1) / 255 - np.array(IMAGENET_MEAN, np.float32)[:, None, None]) / np.array(IMAGENET_STD, np.float32)[:, None, None]
    assert np.abs(pixels[0].numpy() - expected).max() <= 1e-5


@pytest.mark.parametrize("kwargs", [dict(mode="full", size=100), dict(mode="full", size=0), dict(mode="square")])
def test_bad_modes_and_sizes(kwargs):
    with pytest.raises(ValueError):
        preprocess(synthetic_photo(50, 50), **kwargs)


def test_rejects_non_images():
    with pytest.raises(TypeError, match="PIL"):
        preprocess([np.zeros((10, 10, 3), np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        preprocess([])


def test_batch_normalization_equals_per_image():
    from dinoseek.model.preprocess import normalize, normalize_batch, resize_for_mode

    arrays = np.stack([np.asarray(resize_for_mode(synthetic_photo(300, 280, seed=i), "crop", 224)) for i in range(3)])
    expected = np.stack([normalize(a) for a in arrays])
    assert np.array_equal(normalize_batch(arrays).numpy(), expected)


def test_preprocess_of_pil_images_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable" was one
        assert preprocess([Image.new("RGB", (300, 240), (10, 20, 30))], mode="crop").shape == (1, 3, 224, 224)
