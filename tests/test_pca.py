"""First-PC analysis against a float64 NumPy SVD reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax import (
    first_pc_cosine_similarity,
    first_pc_direction,
    first_pc_scores,
    first_pc_variance_fraction,
    remove_first_pc,
)

N = 300


def _ref(x):
    """Fraction, sign-fixed scores u₁ and direction v₁ from the SVD of the centred x."""
    xc = x.reshape(len(x), -1)
    xc = xc - xc.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    sign = np.sign(u[np.argmax(np.abs(u[:, 0])), 0])
    return s[0] ** 2 / np.sum(s**2), sign * u[:, 0], sign * vt[0]


def _rank_one_plus_noise(seed, n=N, p=20, signal=3.0):
    """Signal z·v (z ~ N(0, signal²), |v| = 1) plus unit isotropic noise: (n, p) and z."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=p)
    z = signal * rng.normal(size=(n, 1))
    return z * v / np.linalg.norm(v) + rng.normal(size=(n, p)) + 4.0, z[:, 0]


@pytest.mark.parametrize("n, p", [(N, 20), (40, 60)])  # covariance (n > p) and gram (n <= p) paths
def test_matches_svd_reference_float64(x64, n, p):
    x, _ = _rank_one_plus_noise(0, n=n, p=p)
    fraction, u, v = _ref(x)
    np.testing.assert_allclose(first_pc_variance_fraction(x), fraction, atol=1e-10)
    scores = first_pc_scores(x)
    assert scores.dtype == jnp.float64
    np.testing.assert_allclose(scores, u, atol=1e-8)
    np.testing.assert_allclose(first_pc_direction(x), v, atol=1e-8)
    removed = remove_first_pc(x)
    xc = x - x.mean(0)
    np.testing.assert_allclose(removed, xc - np.outer(u, u @ xc), atol=1e-8)


def test_planted_fraction_and_scores_float32():
    x, z = _rank_one_plus_noise(1)
    x = x.astype(np.float32)
    # First PC variance ≈ signal² + 1 out of signal² + p.
    np.testing.assert_allclose(first_pc_variance_fraction(x), 10.0 / 29.0, atol=0.03)
    scores = first_pc_scores(x)
    assert scores.shape == (N,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(scores), 1.0, atol=1e-5)
    assert abs(np.corrcoef(scores, z)[0, 1]) > 0.9
    fraction, u, v = _ref(x.astype(np.float64))
    np.testing.assert_allclose(first_pc_variance_fraction(x), fraction, atol=1e-5)
    np.testing.assert_allclose(scores, u, atol=1e-4)
    np.testing.assert_allclose(first_pc_direction(x), v, atol=1e-4)


def test_sign_convention():
    x, _ = _rank_one_plus_noise(2)
    x = x.astype(np.float32)
    scores, direction = first_pc_scores(x), first_pc_direction(x)
    assert scores[jnp.argmax(jnp.abs(scores))] > 0
    np.testing.assert_allclose(first_pc_scores(-x), scores, atol=1e-5)
    np.testing.assert_allclose(first_pc_direction(-x), -direction, atol=1e-5)
    projection = (x - x.mean(0)) @ direction
    np.testing.assert_allclose(projection / jnp.linalg.norm(projection), scores, atol=1e-4)


def test_remove_first_pc_is_orthogonal_and_keeps_shape():
    x, _ = _rank_one_plus_noise(3, p=24)
    x = x.astype(np.float32).reshape(N, 4, 6)
    removed = remove_first_pc(x)
    assert removed.shape == x.shape
    flat = removed.reshape(N, -1)
    np.testing.assert_allclose(flat @ first_pc_direction(x), 0.0, atol=1e-3)
    np.testing.assert_allclose(first_pc_scores(x) @ flat, 0.0, atol=1e-3)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-4)
    # What is left has the second PC as its first one.
    s = np.linalg.svd(x.reshape(N, -1) - x.reshape(N, -1).mean(0), compute_uv=False)
    np.testing.assert_allclose(first_pc_variance_fraction(removed), s[1] ** 2 / np.sum(s[1:] ** 2), rtol=1e-3)


def test_cosine_similarity_across_widths():
    x, _ = _rank_one_plus_noise(4)
    rng = np.random.default_rng(5)
    wider = x @ np.linalg.qr(rng.normal(size=(30, 20)))[0].T  # orthonormal embedding, 20 -> 30 features
    unrelated, _ = _rank_one_plus_noise(6)
    sims = first_pc_cosine_similarity([x, wider, unrelated])
    assert sims.shape == (3, 3)
    np.testing.assert_allclose(jnp.diag(sims), 1.0, atol=1e-5)
    np.testing.assert_allclose(sims, sims.T)
    np.testing.assert_allclose(sims[0, 1], 1.0, atol=1e-4)
    assert sims[0, 2] < 0.3
    _, u0, _ = _ref(x)
    _, u2, _ = _ref(unrelated)
    np.testing.assert_allclose(sims[0, 2], abs(u0 @ u2), atol=1e-4)
    with pytest.raises(ValueError, match=r"\(300, 20\).*\(299, 20\)"):
        first_pc_cosine_similarity([x, x[:-1]])
    with pytest.raises(ValueError, match="at least one"):
        first_pc_cosine_similarity([])


@pytest.mark.parametrize("n, p", [(N, 20), (40, 60)])
def test_constant_representation_gives_nan(n, p):
    x = np.full((n, p), 0.1, dtype=np.float32)
    assert np.isnan(first_pc_variance_fraction(x))
    for result in (first_pc_scores(x), first_pc_direction(x), remove_first_pc(x)):
        assert np.all(np.isnan(result))
