"""PCA from the image encoder's embedding space (768-d for SigLIP) down to the index space (128-d).

As in the paper, embeddings are L2-normalised, projected onto their top principal
components and L2-normalised again, so inner product = cosine in the index. The fit
uses a random sample (default up to 1M vectors): the covariance of a million
vectors pins the top components down as well as the whole catalog would, and the
sample bounds memory however large the catalog grows. The projection is stored as
plain arrays in an `.npz` (never pickle) so any stage, or any language, can apply it.
"""

from __future__ import annotations

import io as _bytes_io
import logging

import numpy as np

from visrec.core import io
from visrec.core.errors import UserError

log = logging.getLogger(__name__)

PCA_FILE = "pca.npz"
_ARRAYS = ("mean", "components", "explained_variance", "explained_variance_ratio")


def l2_normalise(vectors: np.ndarray, precision: type[np.floating] = np.float64,
                 allow_zero: bool = True) -> np.ndarray:
    """Rows scaled to unit length as float32, so a dot product is a cosine similarity.

    The norm is taken in `precision`. float64 by default: features of ~1e-20 (a badly
    initialised network) would underflow to a zero norm in float32 and silently become
    zero vectors. The index and the evaluation compute in float32, as they always have,
    so their neighbours and metrics stay bit-identical. A row with a zero norm stays zero,
    or raises `ValueError` unless `allow_zero` (the index has no direction to file it under).
    """
    vectors = np.asarray(vectors, dtype=precision)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    if not allow_zero and len(vectors) and norms.min() == 0.0:
        raise ValueError("vectors contain an all-zero row")
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0).astype(np.float32, copy=False)


class PcaProjection:
    """A fitted linear projection `x -> normalise((x - mean) @ components.T)`."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained_variance: np.ndarray,
                 explained_variance_ratio: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)
        self._explained_variance = np.asarray(explained_variance, dtype=np.float64)
        self.explained_variance_ratio = np.asarray(explained_variance_ratio, dtype=np.float64)
        if self.components.ndim != 2 or self.mean.shape != (self.components.shape[1],):
            raise UserError(f"inconsistent PCA arrays: mean {self.mean.shape}, components {self.components.shape}")

    @property
    def input_dims(self) -> int:
        return int(self.components.shape[1])

    @property
    def dims(self) -> int:
        """Output dimensionality."""
        return int(self.components.shape[0])

    @property
    def explained_variance(self) -> float:
        """Fraction of the sample's total variance the kept components explain (0..1)."""
        return float(self.explained_variance_ratio.sum())

    @classmethod
    def fit(cls, vectors: np.ndarray, dims: int, sample_size: int = 1_000_000, seed: int = 0) -> "PcaProjection":
        """Fit on (at most `sample_size` randomly sampled rows of) `vectors`, keeping `dims` components.

        `dims` is capped at the input dimensionality and the number of sampled rows
        (a warning says so): tiny stand-in models have fewer than 128 dimensions.
        """
        from sklearn.decomposition import PCA

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) < 2:
            raise UserError(f"PCA needs at least 2 vectors of shape (n, d), got {vectors.shape}")
        if dims < 1:
            raise UserError(f"PCA dims must be >= 1, got {dims}")
        if len(vectors) > sample_size:
            rows = np.random.default_rng(seed).choice(len(vectors), size=sample_size, replace=False)
            vectors = vectors[np.sort(rows)]
        kept = min(dims, vectors.shape[1], len(vectors))
        if kept < dims:
            log.warning("PCA: keeping %d components, not %d (input %d-d, %d sampled vectors)",
                        kept, dims, vectors.shape[1], len(vectors))
        # The d x d covariance eigendecomposition: one pass over the sample, float32,
        # no centred copy; far faster than an SVD of the data when n >> d.
        pca = PCA(n_components=kept, svd_solver="covariance_eigh", random_state=seed).fit(vectors)
        ratio = pca.explained_variance_ratio_
        if not np.isfinite(ratio).all():
            log.warning("PCA: the sampled vectors have no variance (are all embeddings the same?)")
            ratio = np.zeros_like(pca.explained_variance_)
        projection = cls(pca.mean_, pca.components_, pca.explained_variance_, ratio)
        log.info("PCA %d -> %d on %d vectors explains %.1f%% of the variance",
                 projection.input_dims, projection.dims, len(vectors), 100 * projection.explained_variance)
        return projection

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Project (n, input_dims) -> (n, dims), L2-normalised."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[-1] != self.input_dims:
            raise UserError(f"PCA expects {self.input_dims}-d vectors, got {vectors.shape[-1]}-d")
        return l2_normalise((vectors - self.mean) @ self.components.T)

    def save(self, uri: str) -> None:
        """Write `uri` (a `.npz` file, local or `gs://`) with the four plain arrays."""
        buf = _bytes_io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components,
                 explained_variance=self._explained_variance,
                 explained_variance_ratio=self.explained_variance_ratio)
        io.write_bytes(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str) -> "PcaProjection":
        """Read a `pca.npz` file, or the `pca.npz` inside a directory (e.g. a stage-3 `pca/` dir)."""
        uri = str(uri)
        if not uri.endswith(".npz"):
            uri = io.join(uri, PCA_FILE)
        try:
            data = io.read_bytes(uri)
        except FileNotFoundError as exc:
            raise UserError(f"PCA file not found: {uri}") from exc
        try:
            with np.load(_bytes_io.BytesIO(data), allow_pickle=False) as npz:
                missing = [k for k in _ARRAYS if k not in npz.files]
                if missing:
                    raise UserError(f"PCA file {uri} lacks array(s) {missing}")
                return cls(*(npz[k] for k in _ARRAYS))
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot read PCA file {uri}: {exc}") from exc

    def __repr__(self) -> str:
        return f"PcaProjection({self.input_dims} -> {self.dims}, explains {self.explained_variance:.3f})"

