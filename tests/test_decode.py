"""Decoding: every awkward file ends as an upright RGB image or a typed, recorded failure."""

from __future__ import annotations

import numpy as np
import pytest
from collection import make_collection
from conftest import synthetic_photo
from PIL import Image

from dinoseek.indexer.decode import DecodeError, read_image, to_rgb


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return root, make_collection(root)


def test_every_file_decodes_or_fails_with_its_status(collection):
    root, expected = collection
    for rel, status in expected.items():
        if status == "ok":
            decoded = read_image(root / rel)
            assert decoded.image.mode == "RGB", rel
        else:
            with pytest.raises(DecodeError) as info:
                read_image(root / rel)
            assert info.value.status == status, (rel, info.value.reason)


def test_exif_orientation_and_metadata(collection):
    root, _ = collection
    for orientation, size in ((6, (200, 320)), (3, (320, 200))):
        decoded = read_image(root / f"camera/rotated{orientation}.jpg", min_side=1000)
        assert decoded.image.size == size  # 6 = rotated 90 degrees: width and height swap
        assert (decoded.width, decoded.height) == (320, 200)  # as stored
        assert decoded.captured_at == "2021-07-04 12:30:00"
        assert decoded.camera == "Canon EOS 5D"
    stored = np.asarray(Image.open(root / "camera/rotated3.jpg").convert("RGB"))  # pixels as stored
    rotated_back = np.asarray(read_image(root / "camera/rotated3.jpg", min_side=1000).image.rotate(180))
    assert np.array_equal(rotated_back, stored)


def test_animation_and_pages_count_frames(collection):
    root, _ = collection
    assert read_image(root / "anim/loop.gif").frames == 3
    tiff = read_image(root / "scans/pages.tiff")
    assert tiff.frames == 2 and tiff.image.size == (200, 150)


def test_sixteen_bit_grey_is_scaled_not_clipped(collection):
    root, _ = collection
    image = np.asarray(read_image(root / "scans/grey16.png").image)
    assert image[..., 0].min() == 0 and image[..., 0].max() == 255
    assert 100 < image[..., 0].mean() < 155  # a ramp, not a white page


def test_alpha_composited_on_white(collection):
    root, _ = collection
    rgb = np.asarray(read_image(root / "web/alpha.png").image, np.float32)
    original = np.asarray(synthetic_photo(256, 256, seed=6), np.float32)
    expected = original * (128 / 255) + 255 * (1 - 128 / 255)
    assert np.abs(rgb - expected).max() <= 2


def test_cmyk_becomes_rgb(collection):
    root, _ = collection
    decoded = read_image(root / "print/cmyk.jpg")
    assert decoded.image.mode == "RGB" and decoded.format == "JPEG"


def test_jpeg_draft_shrinks_large_photos(tmp_path):
    path = tmp_path / "big.jpg"
    synthetic_photo(4000, 3000, seed=1).save(path, quality=90)
    decoded = read_image(path, min_side=256)
    assert decoded.image.size == (500, 375)  # 1/8 DCT scaling keeps the short side >= 256
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert read_image(path, min_side=1000).image.size == (2000, 1500)  # 1/4 would leave 750 < 1000


def test_hash_and_stat(tmp_path):
    import hashlib

    path = tmp_path / "a.png"
    synthetic_photo(50, 40).save(path)
    decoded = read_image(path)
    assert decoded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert decoded.size == path.stat().st_size and decoded.mtime_ns == path.stat().st_mtime_ns


def test_permission_denied(tmp_path):
    import os

    path = tmp_path / "locked.jpg"
    synthetic_photo(50, 40).save(path)
    os.chmod(path, 0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(DecodeError) as info:
        read_image(path)
    assert info.value.status == "unreadable"


def test_heic_without_plugin(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if not installed
    path = tmp_path / "phone.heic"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    with pytest.raises(DecodeError) as info:
        read_image(path)
    assert info.value.status == "needs-plugin" and "pillow-heif" in info.value.reason


def test_float_and_int32_modes_scale_to_their_range():
    ramp = np.linspace(-3.0, 5.0, 64 * 32, dtype=np.float32).reshape(32, 64)
    out = np.asarray(to_rgb(Image.fromarray(ramp, "F")))
    assert out.min() == 0 and out.max() == 255


@pytest.mark.slow
def test_draft_decoding_does_not_move_vectors(tmp_path, small_folder):
    """JPEG DCT downscaling before the resize: cosine >= 0.99 to a full decode (12 MP photos)."""
    from dinoseek.model import Encoder, InputSpec

    encoder = Encoder.from_pretrained(small_folder, precision="fp32")
    for mode, size in (("crop", 224), ("full", 224)):
        drafts, fulls = [], []
        for seed in range(3):
            path = tmp_path / f"big{seed}.jpg"
            synthetic_photo(4000, 3000, seed=seed).save(path, quality=92)
            decoded = read_image(path, min_side=256 if mode == "crop" else size)
            assert decoded.image.width < 1000  # the draft really shrank it
            drafts.append(decoded.image)
            fulls.append(Image.open(path).convert("RGB"))
        encoder.input_spec = InputSpec(mode, size)
        a, b = encoder.embed(drafts), encoder.embed(fulls)
        assert (a.cls * b.cls).sum(1).min() >= 0.99, mode
        assert (a.patch * b.patch).sum(1).min() >= 0.99, mode


# EXIF orientation -> the transform that makes the stored pixels upright (EXIF 2.32, tag 0x0112).
UPRIGHT = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_90],
    6: [Image.Transpose.ROTATE_270],
    7: [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_270],
    8: [Image.Transpose.ROTATE_90],
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.png"  # lossless, so pixels compare exactly
    stored = synthetic_photo(64, 40, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif)
    expected = stored
    for step in UPRIGHT[orientation]:
        expected = expected.transpose(step)
    decoded = read_image(path).image
    assert decoded.size == expected.size
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_sixteen_bit_rgb_is_not_clipped(tmp_path):
    import struct
    import zlib

    # Pillow writes no 16-bit RGB PNG, so build one: a horizontal ramp 0..65535 in every channel.
    width, height = 256, 32
    row = np.repeat(np.linspace(0, 65535, width).astype(">u2")[:, None], 3, axis=1).tobytes()
    raw = b"".join(b"\x00" + row for _ in range(height))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = tmp_path / "rgb16.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    out = np.asarray(read_image(path).image).astype(int)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, -1].tolist() == [255, 255, 255]
    assert abs(out[0, 128, 0] - 128) <= 2  # mid-grey stays mid-grey


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("PNG", "png")])
def test_animated_webp_and_apng_first_frame(tmp_path, fmt, ext):
    frames = [synthetic_photo(80, 60, seed=s) for s in range(4)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    decoded = read_image(path)
    assert decoded.frames == 4
    assert np.abs(np.asarray(decoded.image, np.int16) - np.asarray(frames[0], np.int16)).max() <= 1


def test_thin_strips_keep_their_centre(tmp_path):
    path = tmp_path / "strip.png"
    Image.fromarray(np.tile(np.arange(30000, dtype=np.uint16) % 256, (2, 1)).astype(np.uint8)).save(path)
    decoded = read_image(path)
    assert decoded.image.size == (32, 2) and (decoded.width, decoded.height) == (30000, 2)


def test_damaged_multi_frame_files_fail_cleanly(tmp_path):
    import io

    frames = [synthetic_photo(64, 48, seed=s) for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    path = tmp_path / "scan.tif"
    for n in range(100, len(data), 97):  # every truncation either decodes or is a DecodeError
        path.write_bytes(data[:n])
        try:
            read_image(path)
        except DecodeError as e:
            assert e.status in ("truncated", "unidentified")


def test_very_long_file_name(tmp_path):
    path = tmp_path / ("x" * 240 + ".jpg")
    synthetic_photo(40, 30).save(path)
    assert read_image(path).image.size == (40, 30)


@pytest.mark.parametrize(("make", "model", "camera"), [
    ("Canon", "Canon EOS R5", "Canon EOS R5"),
    ("NIKON CORPORATION", "NIKON D750", "NIKON D750"),
    ("Apple", "iPhone 13", "Apple iPhone 13"),
    ("", "Pixel 7", "Pixel 7"),
])
def test_camera_names_the_make_once(tmp_path, make, model, camera):
    exif = Image.Exif()
    if make:
        exif[271] = make
    exif[272] = model
    synthetic_photo(64, 48).save(tmp_path / "p.jpg", exif=exif)
    assert read_image(tmp_path / "p.jpg").camera == camera
