"""JPEGs decoded in batches on the GPU (nvjpeg, through torchvision), for the indexer to run beside
its CPU decode workers.

A file takes this path only when the result can match the CPU path's (`decode.read_image` +
`InputSpec.pixels`): a plain baseline/progressive JPEG (RGB or grey) that ends with its end-of-image
marker, within the pixel and aspect limits (and under GPU_MAX_PIXELS), whose header and EXIF
parse. Everything else (CMYK, MPO, a truncated file, damaged headers, another format named .jpg, a
decoder error) is handed back to the CPU path, which decodes it or records why not exactly as it
always has. nvjpeg itself reports no error for a damaged entropy-coded stream (measured: a
truncated file decodes without one), so the end-of-image marker is what keeps truncated files off
this path; a file damaged in its middle that still ends with the marker is embedded as nvjpeg
decodes it, where Pillow might have refused it.

On the device the CPU path is mimicked step by step: Pillow's draft decodes at a DCT scale 1/s
(s = 8, 4, 2 or 1, both sides kept >= decode_side); at 1/8 each output pixel is its 8x8 block's DC
term, the block mean, so a full decode is area-averaged by s (exact at 1/8, close at 1/2 and 1/4,
whose reduced IDCTs are smooth averages too); then the EXIF orientation; then the InputSpec
geometry with antialiased bicubic (a = -0.5, Pillow's kernel), one axis at a time and rounded to
8 bits in between as Pillow does. Measured: vectors agree with the CPU path's to cosine >= 0.999.

torchvision is optional: nothing here imports it until a GPU decoder is asked for.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinoseek.model.preprocess import RESIZE_SHORT, InputSpec, shortest_edge_size

from .decode import MAX_ASPECT, MAX_PIXELS, exif_fields, open_header, read_file
from .errors import IndexerError, first_line

log = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "cpu", "gpu")
# Routed to the GPU by name; the bytes are checked before any decoding (an HTML page named .jpg
# goes back to the CPU path, which records it as today).
JPEG_SUFFIXES = (b".jpg", b".jpeg", b".jpe", b".jfif")
_SOI, _EOI = b"\xff\xd8\xff", b"\xff\xd9"
# Larger JPEGs go to the CPU path: a batch is decoded at full size on the encoder's GPU (32 x 50 MP x
# 3 bytes is 4.8 GB), and the CPU's draft decoding never holds the full-size pixels at all.
GPU_MAX_PIXELS = 50_000_000
_TRANSPOSES = {  # EXIF orientation -> what ImageOps.exif_transpose does, on (..., H, W) tensors
    2: lambda x: x.flip(-1),  # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),  # ROTATE_180
    4: lambda x: x.flip(-2),  # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),  # TRANSPOSE
    6: lambda x: torch.rot90(x, -1, (-2, -1)),  # ROTATE_270 (counter-clockwise), i.e. 90 clockwise
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),  # TRANSVERSE
    8: lambda x: torch.rot90(x, 1, (-2, -1)),  # ROTATE_90
}

# list of JPEG files' bytes -> one (3, H, W) or (1, H, W) uint8 tensor each, as stored (no EXIF
# orientation), full size, on the device the geometry then runs on. Raises if any file fails.
BatchDecoder = Callable[[list[bytes]], list[torch.Tensor]]


class GpuDecodeUnavailableError(IndexerError):
    """`--decode gpu` was asked for where JPEGs cannot be decoded on the GPU; says what is missing."""


@dataclass(frozen=True)
class JpegFile:
    """A JPEG read and its header parsed (pixels not decoded yet): what the GPU path needs."""

    data: bytes
    meta: dict  # the row's columns, exactly as the CPU path gives them (pipeline.Decoded.meta)
    orientation: int  # EXIF orientation, 1 to 8
    scale: int  # the DCT scale the CPU path's draft decodes at: 1, 2, 4 or 8


def is_jpeg_name(rel: bytes) -> bool:
    return rel.lower().endswith(JPEG_SUFFIXES)


def draft_scale(width: int, height: int, min_side: int) -> int:
    """The reduction Pillow's `JpegImageFile.draft(mode, (min_side, min_side))` picks: the largest
    of 8, 4, 2, 1 that keeps both sides >= min_side (its output is ceil(side / scale))."""
    fits = min(width // min_side, height // min_side)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def read_jpeg(path: str | bytes | os.PathLike, spec: InputSpec, *, max_pixels: int = MAX_PIXELS) -> JpegFile | None:
    """Read `path` (bytes, sha256, stat checks) and parse its JPEG header without decoding pixels.

    Raises DecodeError where the CPU path would record the file without decoding it (unreadable,
    empty, changed while read, too large a file): the same function says so for both. None: a
    file the GPU path does not take (the CPU path decodes it or records why not).
    """
    data, meta = read_file(path)
    # No end-of-image marker: truncated (the CPU path records it), or data appended after it.
    if not data.startswith(_SOI) or not data[-64:].rstrip(b"\x00").endswith(_EOI):
        return None
    try:
        image = open_header(data, in_thread=True)
        exif = image.getexif()  # what exif_transpose reads; a corrupt block: the CPU path decides
        orientation = int(exif.get(0x0112, 1))
    except Exception:
        return None
    width, height = image.size
    # Progressive files have one tile too; several would mean Pillow's draft does nothing.
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or len(image.tile) != 1:
        return None
    if width * height > min(max_pixels, GPU_MAX_PIXELS):
        return None
    scale = draft_scale(width, height, spec.decode_side)
    w, h = -(-width // scale), -(-height // scale)
    if w > MAX_ASPECT * h or h > MAX_ASPECT * w:  # limit_aspect would crop it: the CPU path does
        return None
    captured_at, camera = exif_fields(image)
    meta.update(width=width, height=height, format="JPEG", frames=1, captured_at=captured_at, camera=camera)
    return JpegFile(data, meta, orientation if orientation in _TRANSPOSES else 1, scale)


def _drafted(image: torch.Tensor, orientation: int, scale: int) -> torch.Tensor:
    """(3, H, W) uint8 as stored -> (1, 3, h, w) uint8: Pillow's draft reduction, then the EXIF
    orientation; what `read_image` hands to `spec.pixels`. Kept in 8 bits (its values are whole
    levels) while the rest of its batch is decoded: a quarter of the GPU memory of floats."""
    x = image.unsqueeze(0).float()  # (1, 3, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey: Pillow's L -> RGB repeats the channel
    if scale > 1:
        # The draft's DCT scaling; ceil_mode averages the partial blocks at the edges over the
        # pixels they have (the encoder padded them by repeating the edge).
        x = F.avg_pool2d(x, scale, ceil_mode=True).round()  # (1, 3, ceil(H/s), ceil(W/s))
    if orientation in _TRANSPOSES:
        x = _TRANSPOSES[orientation](x)
    return x.to(torch.uint8)


def _geometry(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(N, 3, h, w) uint8, images of one size, as `_drafted` made them -> (N, size, size, 3) uint8,
    on their device: the InputSpec's resize and crop, as `spec.pixels` does them on the CPU. Each
    image is computed on its own (the kernels are per image), so N images of one size take one
    launch per step instead of N."""
    x = x.float()
    h, w = x.shape[-2:]
    size = spec.size
    if spec.mode == "crop":
        new_w, new_h = shortest_edge_size(w, h, RESIZE_SHORT)
        x = _resize(x, new_h, new_w)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        if left < 0 or top < 0:  # size > 256: padded with zeros, as resize_for_mode does
            pad_x, pad_y = max(0, -left), max(0, -top)
            x = F.pad(x, (pad_x, max(size, new_w) - new_w - pad_x, pad_y, max(size, new_h) - new_h - pad_y))
            left, top = max(0, left), max(0, top)
        x = x[..., top:top + size, left:left + size]
    else:
        x = _resize(x, size, size)
    return x.permute(0, 2, 3, 1).to(torch.uint8)  # (N, size, size, 3)


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's BICUBIC resize of (N, 3, H, W) float holding 8-bit values: width first, then
    height, each pass rounded and clipped to 8 bits, as Pillow's two passes are."""
    if x.shape[-1] != width:
        x = F.interpolate(x, size=(x.shape[-2], width), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    if x.shape[-2] != height:
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255)
    return x


def decode_batch(files: Sequence[JpegFile], decoder: BatchDecoder, spec: InputSpec) -> list[np.ndarray | None]:
    """Each file's (size, size, 3) uint8 pixels, or None for a file the decoder could not take (it
    goes to the CPU path). One batched decoder call (if it fails, each file alone); each image is
    reduced as soon as it is decoded, then the images of one reduced size (a camera's photos, in
    the orientations it took them) are resized together, and copied back to the host at once."""
    images = _decode_each(decoder, [f.data for f in files])
    by_size: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, (file, image) in enumerate(zip(files, images)):
        if image is None or image.ndim != 3 or tuple(image.shape[1:]) != (file.meta["height"], file.meta["width"]):
            continue  # nvjpeg read the header differently from Pillow: not the same image
        drafted = _drafted(image, file.orientation, file.scale)
        by_size.setdefault(tuple(drafted.shape[-2:]), []).append((i, drafted))
        images[i] = None  # the full-size image is freed as soon as it is reduced
    out: list[np.ndarray | None] = [None] * len(files)
    order, made = [], []
    for size in list(by_size):
        group = by_size.pop(size)  # its reduced images are freed once resized
        order += [i for i, _ in group]
        made.append(_geometry(torch.cat([x for _, x in group]), spec))
    if made:
        for i, pixels in zip(order, torch.cat(made).cpu().numpy()):  # one copy back: (B, size, size, 3)
            out[i] = pixels
    return out


def _decode_each(decoder: BatchDecoder, datas: list[bytes]) -> list[torch.Tensor | None]:
    try:
        images = list(decoder(datas))
        if len(images) == len(datas):
            return images
    except Exception as e:
        log.debug("batched JPEG decode failed (%s); decoding one by one", e)
    out: list[torch.Tensor | None] = []
    for data in datas:
        try:
            out.append(decoder([data])[0])
        except Exception:
            out.append(None)
    return out


def nvjpeg_decoder(device: torch.device) -> BatchDecoder:
    """torchvision's batched nvjpeg decode onto `device` (which must be CUDA)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # The files' bytes are handed over as they are: nvjpeg only reads them. Copying them to make
    # them writable cost a memory copy of every file (3 MB for 12 MP) in the decoding thread.
    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

    def decode(datas: list[bytes]) -> list[torch.Tensor]:
        return decode_jpeg([torch.frombuffer(d, dtype=torch.uint8) for d in datas], mode=ImageReadMode.RGB,
                           device=device)

    return decode


def gpu_decode_problem(device: torch.device | str) -> str | None:
    """Why JPEGs cannot be decoded on `device` here (one line), or None when they can: CUDA,
    torchvision, and a tiny JPEG decoded by its nvjpeg."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"the encoder runs on {device.type}, not on a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    try:
        decoder = nvjpeg_decoder(device)
    except Exception as e:
        return (f"torchvision is not usable ({type(e).__name__}: {first_line(e)}); "
                f"install the build matching torch {torch.__version__}: pip install torchvision")
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buffer, "JPEG")
    try:
        (probe,) = decoder([buffer.getvalue()])
        if tuple(probe.shape) != (3, 16, 16):
            return f"torchvision's CUDA decode_jpeg returned shape {tuple(probe.shape)} for a 16x16 JPEG"
    except Exception as e:
        return f"torchvision cannot decode JPEGs on {device} ({type(e).__name__}: {first_line(e)})"
    return None


def jpeg_decoder_for(choice: str, device: torch.device | str | None) -> BatchDecoder | None:
    """The batch decoder `--decode CHOICE` means for an encoder on `device`: None for the CPU path
    alone. "auto" uses the GPU where it works, silently; "gpu" raises GpuDecodeUnavailableError
    where it does not."""
    if choice not in DECODE_CHOICES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {choice!r}")
    if choice == "cpu":
        return None
    device = torch.device(device if device is not None else "cpu")
    problem = gpu_decode_problem(device)
    if problem is None:
        return nvjpeg_decoder(device)
    if choice == "gpu":
        raise GpuDecodeUnavailableError(f"cannot decode JPEGs on the GPU: {problem}")
    # Said with -v where the encoder is on a GPU (torchvision missing, say); on a CPU it goes without saying.
    log.log(logging.INFO if device.type == "cuda" else logging.DEBUG, "JPEGs decoded on the CPU: %s", problem)
    return None



def quiet_header_warnings() -> None:
    """Header parsing runs in threads, where `warnings.catch_warnings` (process-global) cannot be
    used: silence, once, the warnings read_image silences around the same calls (damaged EXIF
    worked around; the decompression-bomb warning our own pixel limit replaces)."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message=r"(?i).*corrupt exif", category=UserWarning)


class DaemonThreads:
    """A minimal executor on daemon threads. A thread stuck reading a hung file system cannot be
    killed; unlike ThreadPoolExecutor's (joined at exit), these never keep the process alive."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(count)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as e:
                future.set_exception(e)

    def shutdown(self, wait: float = 0.0) -> None:
        """Stop after the jobs already taken; wait up to `wait` seconds for them."""
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
