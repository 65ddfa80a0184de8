"""The image of an upsert request: base64 bytes or an `image_uri`, checked and decoded before
anything is embedded or written."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visrec.core import io
from visrec.core.errors import UserError
from visrec.online.config import ServingConfig
from visrec.online.errors import BadItem

if TYPE_CHECKING:
    from PIL import Image


def read_upload(fields: dict[str, Any], config: ServingConfig,
                image_size: int | None) -> tuple[bytes, Image.Image] | None:
    """(bytes, decoded image) of the request's `image` (base64) or `image_uri`, None if it carries
    neither; `BadItem` if it cannot be read or decoded, or is over `config.max_image_pixels`.
    The image is decoded no bigger than an encoder input of `image_size` pixels a side needs."""
    from visrec.data.images import ImageDecodeError, decode_image

    if fields.get("image") is not None:
        try:
            data = base64.b64decode(fields["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadItem(f"`image` is not valid base64: {exc}") from None
    elif fields.get("image_uri"):
        data = _read_image_uri(fields["image_uri"], config.image_root)
    else:
        return None
    try:
        return data, decode_image(data, max_pixels=config.max_image_pixels, target_size=image_size)
    except ImageDecodeError as exc:
        raise BadItem(f"image does not decode: {exc}") from None


def _read_image_uri(uri: str, root: str | None) -> bytes:
    """The bytes at `uri`: any `gs://` object, or a local path under `root` (None: none allowed)."""
    from visrec.data.images import load_image_bytes

    if not io.is_gcs(uri):
        if root is None:
            raise BadItem("local image_uri paths are disabled (no image root configured)")
        resolved = (Path(root) / uri).resolve()
        if not resolved.is_relative_to(Path(root).resolve()):
            raise BadItem("image_uri points outside the image root")
    try:
        return load_image_bytes(uri, root)
    except (FileNotFoundError, UserError, OSError) as exc:
        raise BadItem(f"cannot read image_uri {uri}: {exc}") from None
