"""Images -> `pixel_values`, equal to the reference image processor (transformers, PIL backend)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SHORT = 256  # "crop" mode: shortest edge before the center crop (facebook/dinov2-* processor)
CROP = 224
PATCH = 14
# Input sides accepted: at least one patch; at 4096 px a ViT already attends over 85,000 tokens,
# beyond which a typo (--size 50000) would only exhaust memory.
MIN_SIZE, MAX_SIZE = PATCH, 4096

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference does it: transparency composited onto white, other modes converted by PIL."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side at `short`, the long side truncated like the reference."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def resize_for_mode(image: Image.Image, mode: str, size: int) -> Image.Image:
    """The geometric step of `preprocess` on one RGB image."""
    if mode == "crop":
        image = image.resize(shortest_edge_size(*image.size, RESIZE_SHORT), Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        if left < 0 or top < 0:  # only when size > 256: the reference pads with zeros, so do we
            canvas = Image.new("RGB", (max(size, image.width), max(size, image.height)))
            canvas.paste(image, (max(0, -left), max(0, -top)))
            image, left, top = canvas, max(0, left), max(0, top)
        return image.crop((left, top, left + size, top + size))
    # "full": the whole frame squeezed to size x size, so nothing near the border is lost to a crop.
    return image.resize((size, size), Image.Resampling.BICUBIC)


def normalize(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB (PIL image or (H, W, 3) array) -> (3, H, W) float32, scaled to [0, 1] and
    standardized with ImageNet statistics."""
    array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
    return (array * np.float32(1 / 255) - _MEAN) / _STD


def normalize_batch(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, the same arithmetic as `normalize` in torch's
    vectorized, multi-threaded kernels (the indexer's hot path)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() * np.float32(1 / 255)
    mean = torch.from_numpy(_MEAN).unsqueeze(0)
    std = torch.from_numpy(_STD).unsqueeze(0)
    return ((x - mean) / std).contiguous()


def check_input_spec(mode: str, size: int) -> None:
    """Raise ValueError/TypeError unless (mode, size) is an input the encoder can take."""
    if mode not in ("crop", "full"):
        raise ValueError(f"mode must be 'crop' or 'full', got {mode!r}")
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an integer number of pixels, got {type(size).__name__} {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    if mode == "full" and size % PATCH:
        raise ValueError(f"size for mode 'full' must be a multiple of {PATCH}, got {size}")


def preprocess(
    images: Image.Image | Iterable[Image.Image], mode: str = "crop", size: int | None = None
) -> torch.Tensor:
    """PIL image(s) -> pixel_values (B, 3, size, size) float32.

    mode "crop" equals the facebook/dinov2 image processor: RGB, shortest edge 256 (bicubic),
    center crop 224, rescale, ImageNet mean/std. Mode "full" keeps the whole image: resized to
    size x size (a multiple of 14, default 224) without cropping — for duplicate detection.
    """
    size = CROP if size is None else size
    check_input_spec(mode, size)
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL.Image.Image, got {type(image).__name__}")
        arrays.append(normalize(resize_for_mode(to_rgb(image), mode, size)))
    if not arrays:
        raise ValueError("no images to preprocess")
    return torch.from_numpy(np.stack(arrays))
