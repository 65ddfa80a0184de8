"""Shared image helpers: decoding real-world files, URI resolution, resize+pad, JPEG."""

from __future__ import annotations

import io as _bytes_io

import pytest
from PIL import Image

from visrec.images import ImageDecodeError, decode_image, encode_jpeg, load_image_bytes, resize_and_pad


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = _bytes_io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("data", [b"", b"<!DOCTYPE html><html>403</html>", bytes(range(256)) * 4])
def test_non_images_raise(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_truncated_jpeg_raises():
    data = _encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_modes_become_rgb_and_transparency_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img = decode_image(_encoded(rgba, "PNG"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(_encoded(Image.new("L", (4, 4), 7), "PNG")).getpixel((1, 1)) == (7, 7, 7)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    assert decode_image(_encoded(img, "JPEG", exif=exif)).size == (20, 40)


def test_resize_and_pad_keeps_aspect_centred():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    out = resize_and_pad(img, 64)
    assert out.size == (64, 64)
    assert out.getpixel((32, 0)) == (255, 255, 255)  # padding above
    assert out.getpixel((32, 32)) == (0, 0, 0)  # the photo, 64x32 in the middle
    assert out.getpixel((32, 15)) == (255, 255, 255) and out.getpixel((32, 17)) == (0, 0, 0)
    assert resize_and_pad(Image.new("RGB", (10, 30)), 60).size == (60, 60)  # small images are scaled up


def test_encode_jpeg_round_trips():
    data = encode_jpeg(Image.new("RGB", (16, 16), (10, 200, 30)), quality=95)
    assert data[:2] == b"\xff\xd8"
    r, g, b = decode_image(data).getpixel((8, 8))
    assert abs(r - 10) + abs(g - 200) + abs(b - 30) < 12


def test_load_image_bytes_resolves_relative_and_absolute(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"abc")
    assert load_image_bytes("images/a.jpg", str(tmp_path)) == b"abc"
    assert load_image_bytes(str(tmp_path / "images" / "a.jpg"), "/elsewhere") == b"abc"
    with pytest.raises(FileNotFoundError):
        load_image_bytes("images/missing.jpg", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_image_bytes("images", str(tmp_path))
