"""Images -> `pixel_values`, equal to the reference image processor (transformers, PIL backend) for
8-bit images; 16-bit and float images are scaled to 8 bits first, where the reference would clip."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import InvalidArgumentError

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
    """Any Pillow mode -> RGB, as the reference does it for the modes it handles (transparency
    composited onto white, other modes converted by PIL) and sensibly for those it clips: 16-bit
    greys are scaled to 8 bits, 32-bit int and float images to their own range, rather than clipped
    to white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            top = 65535.0
        else:  # 32-bit int or float: scale to the data's own range
            low, top = float(array.min()), float(array.max())
            array = array - low
            top = max(top - low, 1e-12)
        grey = np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    # An explicit list, not "A" in getbands(): LAB's second band is also called "A".
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or image.info.get("transparency") is not None:
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
    # torch warns on read-only arrays (PIL's np.asarray): copy those, share the rest.
    x = torch.from_numpy(np.require(pixels, requirements="W")).permute(0, 3, 1, 2).float() * np.float32(1 / 255)
    mean = torch.from_numpy(_MEAN).unsqueeze(0)
    std = torch.from_numpy(_STD).unsqueeze(0)
    return ((x - mean) / std).contiguous()


def check_input_spec(mode: str, size: int) -> None:
    """Raise InvalidArgumentError/TypeError unless (mode, size) is an input the encoder can take."""
    if mode not in ("crop", "full"):
        raise InvalidArgumentError(f"mode must be 'crop' or 'full', got {mode!r}")
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an integer number of pixels, got {type(size).__name__} {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidArgumentError(f"size must be {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    if mode == "full" and size % PATCH:
        raise InvalidArgumentError(f"size for mode 'full' must be a multiple of {PATCH}, got {size}")


@dataclass(frozen=True)
class InputSpec:
    """What an encoder takes in. Every way from an image to the model goes through `pixels`, and
    every decoder reads with `decode_side`, so one file gives one vector whichever command reads it."""

    mode: str = "crop"  # "crop": the reference's shortest edge 256 + center crop; "full": the whole frame squeezed
    size: int = CROP  # side of the square the model sees

    def __post_init__(self) -> None:
        check_input_spec(self.mode, self.size)

    @property
    def decode_side(self) -> int:
        """The short side a decoder must keep when it shrinks while decoding (JPEG draft): the 256
        that crop mode resizes to before cropping, else the input side itself."""
        return RESIZE_SHORT if self.mode == "crop" else self.size

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Any PIL image -> (size, size, 3) uint8: RGB and geometry done, normalization left to the encoder."""
        return np.asarray(resize_for_mode(to_rgb(image), self.mode, self.size), dtype=np.uint8)

    def as_dict(self) -> dict:
        """The form library manifests record (`"preprocess"`)."""
        return {"mode": self.mode, "size": self.size}


def preprocess(
    images: Image.Image | Iterable[Image.Image], mode: str = "crop", size: int | None = None
) -> torch.Tensor:
    """PIL image(s) -> pixel_values (B, 3, size, size) float32.

    mode "crop" equals the facebook/dinov2 image processor: RGB, shortest edge 256 (bicubic),
    center crop 224, rescale, ImageNet mean/std. Mode "full" keeps the whole image: resized to
    size x size (a multiple of 14, default 224) without cropping — for duplicate detection.
    """
    spec = InputSpec(mode, CROP if size is None else size)
    if isinstance(images, Image.Image):
        images = [images]
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected PIL.Image.Image, got {type(image).__name__}")
        arrays.append(normalize(spec.pixels(image)))
    if not arrays:
        raise InvalidArgumentError("no images to preprocess")
    return torch.from_numpy(np.stack(arrays))
