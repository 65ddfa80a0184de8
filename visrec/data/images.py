"""Image helpers shared by every stage that touches product photos.

Marketplace photos come from phones and uploads: any format PIL reads, EXIF
rotations, palette or alpha images, truncated or non-image files. Everything
downstream wants the same thing: an upright RGB image, resized with its aspect
kept and padded to a square, stored as JPEG.
"""

from __future__ import annotations

import io as _bytes_io
import os

from PIL import Image, ImageOps

from visrec.core import io

# Transparent areas and padding become white: the usual product-photo background.
PAD_COLOUR: tuple[int, int, int] = (255, 255, 255)

# Largest image `decode_image` accepts. Most phone photos are 12 MP, a few 24-50 MP; a full-size
# decode costs about 4 bytes a pixel per copy, so 20 MP bounds it to ~80 MB where Pillow's own
# ~89 MP limit let a 30-280 KB PNG take 1.2 GB. Bigger images are refused with an
# ImageDecodeError ("... pixels, over the limit of ..."), read from the header before any
# pixel is decoded; a caller that needs more passes its own `max_pixels`.
MAX_PIXELS: int = 20_000_000

# Modes whose pixels `Image.reduce` can average as they are.
_REDUCIBLE_MODES: frozenset[str] = frozenset({"L", "LA", "RGB", "RGBA"})


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (empty, truncated, not an image, too large)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, target_size: int | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image, decoded now; `ImageDecodeError` if they are not a whole image
    or have more than `max_pixels` pixels.

    Decoding happens here (not lazily) so a truncated file fails now, at the
    row it belongs to, instead of later inside a batch. The pixel count comes
    from the header, so a refused image costs no pixel memory. `target_size`:
    the image only feeds an encoder input of that many pixels a side, so decode
    no bigger than that needs (both sides stay >= `target_size`); None decodes
    at full size.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        # Pillow itself raises DecompressionBombError above twice its own limit and warns between
        # its limit and that; those images are over MAX_PIXELS too, so the warning is harmless here
        # (and a caller's filter that turns it into an error lands in the except below).
        with Image.open(_bytes_io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"{width} x {height} image is {width * height:,} pixels, over the limit of {max_pixels:,}")
            if target_size is not None:
                # Only JPEG implements draft: it decodes at 1/2, 1/4 or 1/8 scale, never below `target_size`.
                img.draft("RGB", (target_size, target_size))
            img.load()
            # In place: no full-size copy for an upright image, and Pillow reads the orientation from the
            # file's own metadata (EXIF, XMP, TIFF tags), which a reduced copy would not carry.
            ImageOps.exif_transpose(img, in_place=True)
            if target_size is not None:
                img = _reduce(img, target_size)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as exc:
        # Pillow reports truncated/unknown data as OSError/UnidentifiedImageError, some plugins as
        # ValueError/SyntaxError/EOFError.
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from None


def _reduce(img: Image.Image, target_size: int) -> Image.Image:
    """`img` shrunk by the largest integer factor that keeps both sides >= `target_size` (unchanged under 2x).

    Bounds what a big non-JPEG costs once decoded. Averaging needs 8-bit grey or colour
    (alpha is averaged premultiplied); palette, 1-bit and 16-bit images become RGB first.
    """
    factor = min(img.size) // target_size
    if factor < 2:
        return img
    if img.mode not in _REDUCIBLE_MODES:
        img = _to_rgb(img)
    return img.reduce(factor)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, PAD_COLOUR)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def load_image_bytes(uri: str, base_dir: str | None = None) -> bytes:
    """The bytes of an image at `uri`: `gs://`, an absolute local path, or a path relative to `base_dir`
    (a local directory or a `gs://` prefix; the listings file's directory). `FileNotFoundError` if absent."""
    uri = str(uri).strip()
    if not io.is_gcs(uri) and not os.path.isabs(uri) and base_dir is not None:
        uri = io.join(str(base_dir), uri)
    if not io.is_gcs(uri) and os.path.isdir(uri):
        raise FileNotFoundError(f"{uri} is a directory")
    return io.read_bytes(uri)


def resize_and_pad(img: Image.Image, size: int, fill: tuple[int, int, int] = PAD_COLOUR) -> Image.Image:
    """Scale `img` so its longest side is `size` (aspect kept), centred on a `size` x `size` square."""
    width, height = img.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new_size != img.size:
        # reducing_gap: a cheap draft downscale first for big photos, then a high-quality resample.
        img = img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if new_size == (size, size):
        return img
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(img, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """RGB image -> baseline JPEG bytes."""
    buf = _bytes_io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
