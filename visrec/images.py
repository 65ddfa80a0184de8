"""Image helpers shared by every stage that touches product photos.

Marketplace photos come from phones and uploads: any format PIL reads, EXIF
rotations, palette or alpha images, truncated or non-image files. Everything
downstream wants the same thing: an upright RGB image, resized with its aspect
kept and padded to a square, stored as JPEG.
"""

from __future__ import annotations

import io as _bytes_io
import os
import warnings

from PIL import Image, ImageOps

from visrec import io

# Transparent areas and padding become white: the usual product-photo background.
PAD_COLOUR: tuple[int, int, int] = (255, 255, 255)


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (empty, truncated, not an image, too large)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> upright RGB PIL image, fully decoded; `ImageDecodeError` if they are not a whole image.

    Decoding happens here (not lazily) so a truncated file fails now, at the
    row it belongs to, instead of later inside a batch.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is raised as an error: such an image is rejected.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_bytes_io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            EOFError) as exc:
        # Pillow reports truncated/unknown data as OSError/UnidentifiedImageError, some plugins as
        # ValueError/SyntaxError/EOFError.
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from None


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
