"""Robust decoding: bytes on disk -> an upright RGB image small enough to embed, or a typed failure.

Every failure is a `DecodeError` with a status the catalog records; nothing is half-decoded.
"""

from __future__ import annotations

import hashlib
import io
import os
import unicodedata
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from dinoseek.model.files import FileTooLargeError, NotRegularFileError, read_regular
from dinoseek.model.preprocess import RESIZE_SHORT, InputSpec, to_rgb

from .errors import DecodeError
from .paths import display_path  # noqa: F401 - its home before paths.py; callers import it from here

# Formats we decode. Anything else Pillow can identify (PSD, EPS, PDF, FITS, ...) is refused before
# its pixel data is touched: some of those plugins call out to other programs or parse complex data.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP", "AVIF", "HEIF"})
# Above this many pixels a header is treated as a decompression bomb (Pillow's own error threshold;
# a larger max_pixels has no effect unless PIL.Image.MAX_IMAGE_PIXELS is raised too).
MAX_PIXELS = 2 * 89_478_485
MAX_FILE_BYTES = 1 << 30  # files are read whole into memory: refuse anything bigger unread
# Thinner than this (long side / short side) is no photo; the centre is kept so a 30000 x 1 strip
# cannot blow up to gigabytes when its short side is resized to 256.
MAX_ASPECT = 16
FAILURE_STATUSES = ("empty", "unidentified", "unsupported", "truncated", "too-large", "needs-plugin", "unreadable",
                    "changed", "crashed")
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # never pad a truncated file with grey and call it decoded


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, upright, possibly reduced by DCT scaling (JPEG draft)
    width: int  # full-resolution size as stored, before orientation and draft
    height: int
    format: str
    frames: int  # animation / page count; the first frame is the one decoded
    sha256: str  # of the file's bytes
    size: int  # bytes
    mtime_ns: int
    captured_at: str | None  # EXIF DateTimeOriginal, "YYYY-MM-DD HH:MM:SS"
    camera: str | None  # EXIF Make + Model


def load_pixels(path: str | os.PathLike | bytes, spec: InputSpec,
                known: frozenset[str] = frozenset()) -> tuple[DecodedImage, np.ndarray | None]:
    """The one way from a file to model-ready pixels, for every caller (the indexer's workers,
    `embed`, search by file, crop re-ranking): decoded no smaller than `spec.decode_side`, then made
    (size, size, 3) uint8 by `spec.pixels`. One file, one vector, whichever command reads it.
    Pixels are None for a file whose sha256 is in `known` (a moved file keeps its vectors)."""
    decoded = read_image(path, min_side=spec.decode_side)
    return decoded, None if decoded.sha256 in known else spec.pixels(decoded.image)


def read_image(path: str | os.PathLike | bytes, *, min_side: int = RESIZE_SHORT, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode `path` to RGB with the short side at least `min_side` where the format allows shrinking.

    The file is read once into memory (content hash, and a stat before and after to catch files
    changed while being read); decoding then happens from that buffer. Only a regular file is read,
    and never more than MAX_FILE_BYTES of it: a path swapped for a FIFO would block the reader
    forever, a symlink to /dev/zero would be read until memory runs out.
    """
    data, meta = read_file(path)
    with warnings.catch_warnings():
        # Pillow warns about damaged metadata it worked around ("Corrupt EXIF data", ...); a file
        # that really cannot be decoded raises, and is recorded with its reason.
        warnings.simplefilter("ignore", UserWarning)
        return _decode(data, min_side, max_pixels, meta)


def read_file(path: str | os.PathLike | bytes) -> tuple[bytes, dict]:
    """`path`'s bytes and their columns (sha256, size, mtime_ns), or the DecodeError `read_image`
    records; shared with the GPU JPEG path so both record a file that cannot be read alike."""
    try:
        before = os.stat(path)
        data = read_regular(path, max_bytes=MAX_FILE_BYTES)
        after = os.stat(path)
    except FileTooLargeError as e:
        raise DecodeError("too-large", e.strerror) from e
    except NotRegularFileError as e:
        raise DecodeError("unreadable", e.strerror) from e
    except OSError as e:
        raise DecodeError("unreadable", f"{e.strerror or e}") from e
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        raise DecodeError("changed", "file changed while it was being read")
    if not data:
        raise DecodeError("empty", "zero-byte file")
    return data, dict(sha256=hashlib.sha256(data).hexdigest(), size=len(data), mtime_ns=after.st_mtime_ns)


def _decode(data: bytes, min_side: int, max_pixels: int, meta: dict) -> DecodedImage:
    try:
        image = open_header(data)
    except UnidentifiedImageError as e:
        if not (data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS):
            raise DecodeError("unidentified", "not an image Pillow recognises") from e
        _register_heif()  # HEIC: Pillow needs the pillow-heif plugin
        try:
            image = open_header(data)
        except UnidentifiedImageError as e2:
            raise DecodeError("unidentified", "unreadable HEIF container") from e2
    fmt = image.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise DecodeError("unsupported", f"format {fmt} is not supported")
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("too-large", f"{width}x{height} exceeds the {max_pixels:,}-pixel limit")
    captured_at, camera = exif_fields(image)
    try:
        frames = getattr(image, "n_frames", 1)  # parses every frame header: damaged files raise here
        if fmt in ("JPEG", "MPO"):
            # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 while both sides stay >= min_side.
            image.draft("RGB", (min_side, min_side))
        image.load()  # first frame only; raises on truncation
        # HEIF decoders apply the orientation themselves; rotating again would double it.
        if fmt not in ("HEIF", "AVIF"):
            image = ImageOps.exif_transpose(image)
        rgb = to_rgb(limit_aspect(image))
    except Image.DecompressionBombError as e:
        raise DecodeError("too-large", str(e)) from e
    except DecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - plugins raise all kinds (TypeError, IndexError, RuntimeError...)
        raise DecodeError("truncated", f"decoding failed: {type(e).__name__}: {e}") from e
    return DecodedImage(rgb, width, height, fmt, frames, captured_at=captured_at, camera=camera, **meta)


def limit_aspect(image: Image.Image) -> Image.Image:
    """Keep the centre MAX_ASPECT:1 part of very thin strips (what a centre crop would use anyway)."""
    w, h = image.size
    if w > MAX_ASPECT * h:
        left = (w - MAX_ASPECT * h) // 2
        return image.crop((left, 0, left + MAX_ASPECT * h, h))
    if h > MAX_ASPECT * w:
        top = (h - MAX_ASPECT * w) // 2
        return image.crop((0, top, w, top + MAX_ASPECT * w))
    return image


def open_header(data: bytes, *, in_thread: bool = False) -> Image.Image:
    """Parse the header only; pixel data is not decoded yet. `in_thread`: called from a thread, where
    `warnings.catch_warnings` (which swaps the process-wide filter list) is not safe; the caller has
    installed the same filters once instead (gpu_jpeg.quiet_header_warnings)."""
    try:
        if in_thread:
            return Image.open(io.BytesIO(data))
        with warnings.catch_warnings():
            # Pillow warns from 89.5 MP and refuses from 179 MP; the explicit check after opening
            # applies our own limit, so the warning is not an error here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError("too-large", f"image header claims too many pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - header parsers raise more than OSError on garbage
        raise DecodeError("unidentified", f"unreadable image header ({type(e).__name__}: {e})") from e


def exif_fields(image: Image.Image) -> tuple[str | None, str | None]:
    try:
        exif = image.getexif()
    except Exception:  # noqa: BLE001 - corrupt EXIF must not cost the image
        return None, None
    make, model = (str(exif.get(tag, "")).strip("\x00 ") for tag in (271, 272))
    # Most makers repeat the make in the model ("Canon" + "Canon EOS R5", "NIKON CORPORATION" + "NIKON D750").
    if make and model.lower().startswith(make.split()[0].lower()):
        make = ""
    camera = " ".join((make, model)).strip() or None
    when = None
    try:
        raw = exif.get_ifd(0x8769).get(36867) or exif.get(306)  # DateTimeOriginal, else DateTime
    except Exception:  # noqa: BLE001
        raw = exif.get(306)
    if isinstance(raw, str) and len(raw) >= 19 and raw[4] == ":" and raw[7] == ":":
        when = f"{raw[0:4]}-{raw[5:7]}-{raw[8:10]} {raw[11:19]}"
    return when, camera


def _register_heif() -> None:
    try:
        from pillow_heif import register_heif_opener
    except ImportError as e:
        raise DecodeError("needs-plugin", "HEIC/AVIF image: install pillow-heif to index it") from e
    register_heif_opener()


# Unicode categories a terminal acts on, or that hide or reorder what is shown: controls (C0, C1,
# DEL; newlines could forge a plan line, ESC sequences clear the screen), format characters (bidi
# overrides and isolates, zero-width spaces and joiners, soft hyphen), surrogates (left by
# undecodable names; they would crash the echo) and the line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def printable(value: object) -> str:
    """`value` (a path as bytes/str/Path, a message, an exception, ...) as one line safe to print:
    unsafe characters become \\xNN, \\uNNNN or \\UNNNNNNNN; raw bytes and Paths go through
    display_path first (undecodable bytes as \\xNN).

    The one escaping function for every message and terminal line. Backslashes are left as they
    are: messages are escaped where they are made (a journal error naming a path) and again at the
    CLI's edge, so escaping must be idempotent; a backslash moves no cursor and hides nothing.
    """
    text = display_path(value) if isinstance(value, (bytes, os.PathLike)) else str(value)
    if text.isprintable() and text.isascii():  # the common case, without a look-up per character
        return text
    out = []
    for ch in text:
        if unicodedata.category(ch) in _UNSAFE_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
