"""PcaProjection: fit against scikit-learn, plain-array round trip, sampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from visrec.core import io
from visrec.core.errors import UserError
from visrec.model.pca import PcaProjection, l2_normalise


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    """Unit vectors with a decaying spectrum, like image embeddings."""
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(3000, 48)) * np.geomspace(4.0, 0.05, 48) + rng.normal(size=48)
    return l2_normalise(raw.astype(np.float32))


def test_fit_matches_sklearn(vectors):
    pca = PcaProjection.fit(vectors, dims=12)
    reference = PCA(n_components=12).fit(vectors.astype(np.float64))
    assert pca.dims == 12 and pca.input_dims == 48
    np.testing.assert_allclose(pca.explained_variance_ratio, reference.explained_variance_ratio_, rtol=1e-4)
    assert pca.explained_variance == pytest.approx(reference.explained_variance_ratio_.sum(), rel=1e-4)
    assert 0.0 < pca.explained_variance <= 1.0
    # Same axes up to sign; the output is the L2-normalised sklearn projection.
    signs = np.sign(np.sum(pca.components * reference.components_, axis=1))
    np.testing.assert_allclose(pca.components * signs[:, None], reference.components_, atol=1e-4)
    expected = l2_normalise(reference.transform(vectors[:50]).astype(np.float32)) * signs
    out = pca.transform(vectors[:50])
    np.testing.assert_allclose(out, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert out.dtype == np.float32


def test_save_load_round_trip_is_plain_arrays(vectors, tmp_path):
    pca = PcaProjection.fit(vectors, dims=8)
    path = tmp_path / "pca" / "pca.npz"
    pca.save(str(path))
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["components", "explained_variance", "explained_variance_ratio", "mean"]
        assert npz["components"].shape == (8, 48) and npz["mean"].shape == (48,)
    for loaded in (PcaProjection.load(str(path)), PcaProjection.load(str(path.parent))):
        np.testing.assert_array_equal(loaded.transform(vectors), pca.transform(vectors))
        assert loaded.explained_variance == pca.explained_variance


def test_fit_on_a_deterministic_sample(vectors):
    a = PcaProjection.fit(vectors, dims=4, sample_size=500, seed=1)
    b = PcaProjection.fit(vectors, dims=4, sample_size=500, seed=1)
    c = PcaProjection.fit(vectors, dims=4, sample_size=500, seed=2)
    np.testing.assert_array_equal(a.components, b.components)
    assert not np.array_equal(a.mean, c.mean)
    # A 500-vector sample finds nearly the same top subspace as all 3000.
    full = PcaProjection.fit(vectors, dims=4)
    overlap = np.linalg.svd(a.components @ full.components.T, compute_uv=False)
    assert overlap.min() > 0.9


def test_dims_capped_by_input(vectors, caplog):
    pca = PcaProjection.fit(vectors[:, :6], dims=128)
    assert pca.dims == 6
    assert pca.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert "keeping 6 components, not 128" in caplog.text


def test_errors(vectors, tmp_path):
    with pytest.raises(UserError, match="not found"):
        PcaProjection.load(str(tmp_path / "missing"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.array([object()], dtype=object), components=np.zeros((1, 1)),
             explained_variance=np.zeros(1), explained_variance_ratio=np.zeros(1))
    with pytest.raises(UserError, match="cannot read"):
        PcaProjection.load(str(bad))
    pca = PcaProjection.fit(vectors, dims=4)
    with pytest.raises(UserError, match="expects 48-d"):
        pca.transform(np.zeros((2, 5), np.float32))
    with pytest.raises(UserError, match="at least 2 vectors"):
        PcaProjection.fit(vectors[:1], dims=4)


def test_gcs_round_trip(vectors, gcs_emulator):
    bucket = gcs_emulator()
    pca = PcaProjection.fit(vectors, dims=8)
    pca.save(f"gs://{bucket}/run/pca/pca.npz")
    assert io.exists(f"gs://{bucket}/run/pca/pca.npz")
    loaded = PcaProjection.load(f"gs://{bucket}/run/pca")
    np.testing.assert_array_equal(loaded.transform(vectors), pca.transform(vectors))
