"""Images -> the vectors the index holds: encoder features, L2-normalised, PCA, L2-normalised again.

One definition of those steps for every path that makes index vectors: stage 3 embeds
the catalog with them (`visrec.stages.embed`), and serving embeds an upserted image and
re-embeds the listings a hand-over carries with them (`visrec.online`), so a vector made
while serving is the very vector the batch stage would have written for the same image.
Stage 3 fits its PCA on the features of the whole run, between the two halves, so it
calls `features` and `project` as two steps of its pipeline; everyone else calls
`encode_images`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from visrec.model.pca import PcaProjection, l2_normalise

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ImageEncoder(Protocol):
    """What encoding needs from an encoder (`visrec.model.encoders.load_image_encoder`, or stage 3's
    device wrapper around one): pixel batch (n, 3, H, W) in, features (n, d) out."""

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...


class PreprocessingEncoder(ImageEncoder, Protocol):
    """An `ImageEncoder` that carries its own image processor (`load_image_encoder`'s do)."""

    image_processor: Any


def features(encoder: ImageEncoder, pixel_values: torch.Tensor) -> np.ndarray:
    """Pixel batch -> L2-normalised float32 encoder features (n, d), computed without autograd."""
    import torch

    with torch.inference_mode():
        return l2_normalise(encoder(pixel_values).float().cpu().numpy())


def project(vectors: np.ndarray, pca: PcaProjection | None) -> np.ndarray:
    """L2-normalised features (n, d) -> index vectors: PCA (which L2-normalises again), or as
    they are for a release without PCA."""
    return vectors if pca is None else pca.transform(vectors)


def encode_images(encoder: PreprocessingEncoder, images: Sequence[Image.Image],
                  pca: PcaProjection | None) -> np.ndarray:
    """PIL images -> index vectors (n, d), preprocessed by the encoder's own image processor."""
    from visrec.model.encoders import preprocess_images

    return project(features(encoder, preprocess_images(encoder, images)), pca)
