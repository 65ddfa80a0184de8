"""The one L2 normaliser (`visrec.model.pca.l2_normalise`) the PCA, the index and the evaluation share."""

from __future__ import annotations

import numpy as np
import pytest

from visrec.model.pca import l2_normalise


def test_l2_normalise_precision_and_zero_rows():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    vectors[3] = 0
    for precision in (np.float64, np.float32):
        out = l2_normalise(vectors, precision)
        assert out.dtype == np.float32 and not out[3].any()
        np.testing.assert_allclose(np.linalg.norm(np.delete(out, 3, axis=0), axis=1), 1.0, atol=1e-6)
    # float32 is what the index and the evaluation compute in: the same bits as dividing by a float32 norm
    rows = np.delete(vectors, 3, axis=0)
    np.testing.assert_array_equal(l2_normalise(rows, np.float32), rows / np.linalg.norm(rows, axis=1, keepdims=True))
    # float64 (the default) keeps tiny features from underflowing to a zero norm
    assert l2_normalise(rows * 1e-25)[0].any() and not l2_normalise(rows * 1e-25, np.float32)[0].any()
    with pytest.raises(ValueError, match="all-zero row"):
        l2_normalise(vectors, np.float32, allow_zero=False)
