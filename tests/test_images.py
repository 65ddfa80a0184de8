"""Shared image helpers: decoding real-world files, URI resolution, resize+pad, JPEG."""

from __future__ import annotations

import functools
import io as _bytes_io
import struct
import threading
import time
import warnings
import zlib

import pytest
from PIL import Image, ImageFile

from visrec.data.images import (
    MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    load_image_bytes,
    resize_and_pad,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)
ORIENTATION = 0x0112  # EXIF tag


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = _bytes_io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@functools.cache
def _big(size: tuple[int, int], fmt: str, mode: str = "RGB", orientation: int = 1) -> bytes:
    """A `size` photo in `fmt`: red left half, blue right half; cached, big ones take a while to encode."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return _encoded(img.convert(mode), fmt, exif=exif, **({"compress_level": 1} if fmt == "PNG" else {}))


@functools.cache
def _one_colour_png(size: tuple[int, int]) -> bytes:
    """A real, decodable PNG of `size` that is only a few KB (grey, one colour)."""
    return _encoded(Image.new("L", size, 7), "PNG")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` and holds no pixels: only its header can be read."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


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


def test_images_over_the_pixel_limit_are_refused_before_decoding(monkeypatch):
    data = _one_colour_png((6000, 4000))  # 24 MP in a few KB
    assert len(data) < 100_000 and 6000 * 4000 > MAX_PIXELS

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")
    # PNG and JPEG files load through ImageFile's override of Image.load.
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    start = time.perf_counter()
    message = "6000 x 4000 image is 24,000,000 pixels, over the limit of 20,000,000"
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)
    assert time.perf_counter() - start < 0.1


def test_pixel_limit_accepts_phone_photos_and_is_per_call():
    assert decode_image(_one_colour_png((4000, 3000))).size == (4000, 3000)
    assert decode_image(_one_colour_png((6000, 4000)), max_pixels=24_000_000).size == (6000, 4000)
    with pytest.raises(ImageDecodeError, match="over the limit of 10,000,000"):
        decode_image(_one_colour_png((4000, 3000)), max_pixels=10_000_000)


def test_pillow_bomb_checks_become_decode_errors():
    over_pillow_limit = _png_header(10_000, 10_000)  # 100 MP: Pillow warns, our limit refuses
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageDecodeError, match="over the limit"):
            decode_image(over_pillow_limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a caller that makes warnings errors
        with pytest.raises(ImageDecodeError, match="DecompressionBombWarning"):
            decode_image(over_pillow_limit)
    with pytest.raises(ImageDecodeError, match="DecompressionBombError"):  # over 2x Pillow's limit
        decode_image(_png_header(20_000, 20_000), max_pixels=10**9)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_default_decode_is_a_plain_full_decode(fmt):
    data = _encoded(Image.effect_noise((64, 48), 60).convert("RGB"), fmt)
    with Image.open(_bytes_io.BytesIO(data)) as img:
        expected = img.convert("RGB").tobytes()
    for img in (decode_image(data), decode_image(data, target_size=None), decode_image(data, target_size=64)):
        assert img.mode == "RGB" and img.size == (64, 48) and img.tobytes() == expected


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "P"), ("PNG", "RGBA")])
def test_target_size_decodes_small(fmt, mode):
    img = decode_image(_big((4000, 3000), fmt, mode), target_size=256)
    assert img.mode == "RGB" and 256 <= min(img.size) and img.width <= 2000 and img.height <= 1500
    assert img.width / img.height == pytest.approx(4 / 3, rel=0.01)
    assert _near(img.getpixel((img.width // 4, img.height // 2)), RED)
    assert _near(img.getpixel((3 * img.width // 4, img.height // 2)), BLUE)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_target_size_keeps_exif_rotation(fmt):
    img = decode_image(_big((4000, 3000), fmt, orientation=6), target_size=256)
    assert 256 <= img.width <= 1500 and img.height <= 2000 and img.height > img.width  # upright: portrait
    assert _near(img.getpixel((img.width // 2, img.height // 4)), RED)  # the left half is on top
    assert _near(img.getpixel((img.width // 2, 3 * img.height // 4)), BLUE)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decoding_in_threads_gives_each_image_its_outcome():
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    jobs = [(_encoded(Image.new("RGB", (2000, 1500), c), "JPEG"), c) for c in colours]
    jobs += [(_one_colour_png((6000, 4000)), "over the limit"), (_one_colour_png((5000, 5000)), "over the limit"),
             (_png_header(10_000, 10_000), "over the limit"),  # Pillow warns about this one as well
             (_encoded(Image.new("RGB", (64, 64)), "JPEG")[:300], "Truncated")]
    barrier = threading.Barrier(len(jobs))
    outcomes: list[object] = [None] * len(jobs)

    def decode(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = decode_image(jobs[i][0]).getpixel((1000, 750))
        except ImageDecodeError as exc:
            outcomes[i] = exc.reason

    filters = list(warnings.filters)
    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == filters
    for (_, expected), outcome in zip(jobs, outcomes):
        if isinstance(expected, tuple):
            assert _near(outcome, expected)
        else:
            assert isinstance(outcome, str) and expected in outcome


def _near(pixel: object, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return isinstance(pixel, tuple) and all(abs(p - c) <= tolerance for p, c in zip(pixel, colour))
