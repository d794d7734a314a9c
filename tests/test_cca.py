"""CCA, SVCCA and PWCCA against float64 NumPy references written from the formulas."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax import CCAResult, cca, mean_cca, pwcca, svcca

N = 240


def _inv_sqrt(cov):
    w, v = np.linalg.eigh(cov)
    return v @ np.diag(w**-0.5) @ v.T


def _ref_cca(x, y):
    """Singular values of Σxx^{-1/2} Σxy Σyy^{-1/2} and the x-side canonical weights."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    ixx, iyy = _inv_sqrt(xc.T @ xc), _inv_sqrt(yc.T @ yc)
    a, rho, _ = np.linalg.svd(ixx @ (xc.T @ yc) @ iyy, full_matrices=False)
    return rho, ixx @ a


def _ref_reduce(x, keep):
    """Top-`keep` SVD directions (int) or the fewest explaining a `keep` fraction of variance."""
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    if isinstance(keep, float):
        keep = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1)
    return u[:, :keep] * s[:keep]


def _ref_svcca(x, y, keep):
    return np.mean(_ref_cca(_ref_reduce(x, keep), _ref_reduce(y, keep))[0])


def _ref_pwcca(x, y):
    if x.shape[1] > y.shape[1]:
        x, y = y, x
    rho, w = _ref_cca(x, y)
    xc = x - x.mean(0)
    h = xc @ w
    h /= np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ xc).sum(axis=1)
    return np.sum(alpha / alpha.sum() * rho)


def _pair(seed=0, noise=1.0, spectrum=1.0):
    """x: (N, 6) with uneven feature scales, y: (N, 9) partly a linear function of x.

    `spectrum < 1` gives both a decaying spectrum, so variance fractions select few directions.
    """
    rng = np.random.default_rng(seed)
    decay = spectrum ** np.arange(9)
    x = rng.normal(size=(N, 6)) * decay[:6] @ rng.normal(size=(6, 6)) * np.linspace(0.5, 3.0, 6) + 2.0
    y = x @ rng.normal(size=(6, 9)) + noise * rng.normal(size=(N, 9)) * decay
    return x, y


def test_cca_matches_covariance_reference_float64(x64):
    x, y = _pair()
    result = cca(x, y)
    assert isinstance(result, CCAResult)
    assert result.rho.dtype == jnp.float64 and result.rho.shape == (6,)
    rho, _ = _ref_cca(x, y)
    np.testing.assert_allclose(result.rho, rho, atol=1e-10)
    assert int(result.num_valid) == 6
    np.testing.assert_allclose(mean_cca(x, y), rho.mean(), atol=1e-10)
    # The variates are unit-norm and pairwise correlate at rho.
    np.testing.assert_allclose(np.linalg.norm(result.x_variates, axis=0), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.sum(result.x_variates * result.y_variates, axis=0), rho, atol=1e-10)


def test_cca_float32_default_close_to_reference():
    x, y = _pair(1)
    value = mean_cca(x.astype(np.float32), y.astype(np.float32))
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, _ref_cca(x, y)[0].mean(), atol=2e-4)


def test_cca_rank_deficient_counts_only_real_directions(x64):
    x, y = _pair(2)
    x_dup = np.concatenate([x[:, :4], x[:, :2] - 3.0 * x[:, 2:3]], axis=1)
    result = cca(x_dup, y)
    assert int(result.num_valid) == 4
    np.testing.assert_allclose(result.rho[:4], _ref_cca(x[:, :4], y)[0], atol=1e-8)
    np.testing.assert_allclose(result.rho[4:], 0.0)
    np.testing.assert_allclose(mean_cca(x_dup, y), _ref_cca(x[:, :4], y)[0].mean(), atol=1e-8)


def test_rank_cut_off_has_a_float32_floor():
    x, y = (a.astype(np.float32) for a in _pair(2))
    x_dup = np.concatenate([x[:, :4], x[:, :2] - 3.0 * x[:, 2:3]], axis=1)
    # Rounding noise in the duplicated directions is not counted even with epsilon=0.
    assert int(cca(x_dup, y, epsilon=0.0).num_valid) == 4


def test_svcca_matches_svd_reference(x64):
    x, y = _pair(3, noise=3.0, spectrum=0.8)
    kept = set()
    for keep in (3, np.int64(3), 0.5, 0.8, 0.9, 0.95, 0.99):
        np.testing.assert_allclose(svcca(x, y, keep=keep), _ref_svcca(x, y, keep), atol=1e-8)
        kept.add((_ref_reduce(x, keep).shape[1], _ref_reduce(y, keep).shape[1]))
    assert len(kept) >= 5  # the fractions select different numbers of directions


def test_svcca_keep_fraction_drops_directions(x64):
    x, y = _pair(4, noise=3.0, spectrum=0.5)
    assert abs(float(svcca(x, y, keep=0.5)) - float(svcca(x, y, keep=1.0))) > 1e-3
    np.testing.assert_allclose(svcca(x, y, keep=1.0), mean_cca(x, y), atol=1e-10)


def test_svcca_keep_one_keeps_tiny_directions_in_float32():
    x, y = (a.astype(np.float32) for a in _pair(19))
    x[:, 5] = x[:, 0] + 1e-4 * np.float32(np.std(x)) * np.random.default_rng(20).normal(size=N)
    np.testing.assert_allclose(svcca(x, y, keep=1.0), mean_cca(x, y), atol=1e-6)


@pytest.mark.parametrize("swap", [False, True])
def test_pwcca_matches_morcos_reference(x64, swap):
    x, y = _pair(5, noise=2.0)
    if swap:
        x, y = y, x
    np.testing.assert_allclose(pwcca(x, y), _ref_pwcca(x, y), atol=1e-10)
    assert abs(float(pwcca(x, y)) - float(mean_cca(x, y))) > 1e-3


def test_invariance_to_invertible_linear_maps_and_symmetry(x64):
    x, y = _pair(6, noise=2.0)
    rng = np.random.default_rng(7)
    a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    b = rng.normal(size=(9, 9)) + 3 * np.eye(9)
    xa, yb = x @ a + 5.0, y @ b
    np.testing.assert_allclose(mean_cca(xa, yb), mean_cca(x, y), atol=1e-8)
    np.testing.assert_allclose(mean_cca(y, x), mean_cca(x, y), atol=1e-10)
    # SVCCA keeping the full rank of both sides reduces to CCA and shares its invariance.
    y6 = y[:, :6] @ rng.normal(size=(6, 9))
    np.testing.assert_allclose(svcca(xa, y6 @ b, keep=6), svcca(x, y6, keep=6), atol=1e-8)
    np.testing.assert_allclose(svcca(y6, x, keep=6), svcca(x, y6, keep=6), atol=1e-10)


def test_pwcca_invariant_to_scaling_permutation_and_sign(x64):
    x, y = _pair(8, noise=2.0)
    rng = np.random.default_rng(9)
    signs = rng.choice([-1.0, 1.0], size=6)
    reference = float(pwcca(x, y))
    np.testing.assert_allclose(pwcca(3.0 * x, 0.1 * y), reference, atol=1e-10)
    shuffled = pwcca(x[:, rng.permutation(6)] * signs, y[:, rng.permutation(9)])
    np.testing.assert_allclose(shuffled, reference, atol=1e-10)
    # The fewer-features side is used whichever argument it is.
    np.testing.assert_allclose(pwcca(y, x), reference, atol=1e-10)
    # ...but not invariant to general linear maps of that side.
    a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
    assert abs(float(pwcca(x @ a, y)) - reference) > 1e-4


def test_linear_function_gives_one(x64):
    x, _ = _pair(10)
    y = x @ np.random.default_rng(11).normal(size=(6, 9))
    result = cca(x, y)
    np.testing.assert_allclose(result.rho, 1.0, atol=1e-8)
    for value in (mean_cca(x, y), pwcca(x, y), svcca(x, y, keep=6)):
        np.testing.assert_allclose(value, 1.0, atol=1e-8)


def test_identical_representations_give_one_in_float32():
    x, _ = _pair(12)
    x = x.astype(np.float32)
    for measure in (mean_cca, pwcca, svcca):
        np.testing.assert_allclose(measure(x, x), 1.0, atol=1e-4)


def test_independent_gaussians_give_small_correlation():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(4000, 6)), rng.normal(size=(4000, 9))
    assert float(mean_cca(x, y)) < 0.06
    assert float(pwcca(x, y)) < 0.06


def test_flattens_trailing_dims_and_jits():
    x, y = (a.astype(np.float32) for a in _pair(14))
    np.testing.assert_allclose(mean_cca(x.reshape(N, 2, 3), y), mean_cca(x, y), atol=1e-6)
    np.testing.assert_allclose(jax.jit(pwcca)(x, y), pwcca(x, y), atol=1e-6)
    jitted = jax.jit(svcca, static_argnames="keep")
    np.testing.assert_allclose(jitted(x, y, keep=0.99), svcca(x, y, keep=0.99), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_gives_nan(bad):
    x, y = (a.astype(np.float32) for a in _pair(15))
    x[5, 2] = bad
    for value in (mean_cca(x, y), pwcca(x, y), svcca(x, y), cca(x, y).rho[0]):
        assert np.isnan(float(value))


def test_constant_representation_gives_nan():
    _, y = _pair(16)
    x = np.full((N, 6), 0.1, dtype=np.float32)
    for value in (mean_cca(x, y), pwcca(x, y), svcca(x, y)):
        assert np.isnan(float(value))


def test_bad_shapes_raise():
    x, y = _pair(17)
    with pytest.raises(ValueError, match=r"\(240, 6\).*\(239, 9\)"):
        cca(x, y[:-1])
    with pytest.raises(ValueError, match=r"\(240,\)"):
        mean_cca(x[:, 0], y)
    with pytest.raises(ValueError, match=r"\(240, 0\)"):
        svcca(x[:, :0], y)
    with pytest.raises(ValueError, match=r"\(1, 6\).*degenerate"):
        pwcca(x[:1], y[:1])


def test_too_few_examples_raise_and_overlap_warns():
    rng = np.random.default_rng(18)
    x, y = rng.normal(size=(10, 9)), rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match=r"\(10, 9\).*\(10, 3\).*degenerate"):
        mean_cca(x, y)
    with pytest.raises(ValueError, match="degenerate"):
        svcca(x, x, keep=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cca(rng.normal(size=(20, 11)), rng.normal(size=(20, 8)))
    with pytest.warns(UserWarning, match="at least 1 canonical"):
        result = cca(rng.normal(size=(20, 12)), rng.normal(size=(20, 8)))
    # p + q - (n - 1) = 1 correlation is 1 for independent noise, as the warning says.
    np.testing.assert_allclose(result.rho[0], 1.0, atol=1e-4)
    assert float(result.rho[1]) < 0.999


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.1, 7, True, "all"])
def test_svcca_keep_out_of_range_raises(keep):
    x, y = _pair(20)
    with pytest.raises(ValueError, match="keep"):
        svcca(x, y, keep=keep)


# svcca's default keep=0.99 keeps a data-dependent number of directions, up to min(p, n - 1): on
# layers with p >= n - 1 it returned ~1 for independent noise while cca refused the same shapes.
WIDE = {"wide-x": (30, 40, 5), "wide-both": (30, 200, 100), "p=n-1": (30, 29, 5), "q=n-1": (30, 5, 29)}


@pytest.mark.parametrize("n, p, q", WIDE.values(), ids=WIDE.keys())
@pytest.mark.parametrize("keep", [0.99, 0.5, 1.0])
def test_svcca_fraction_on_wide_layers_refuses_like_cca(n, p, q, keep):
    rng = np.random.default_rng(21)
    x, y = rng.normal(size=(n, p)).astype(np.float32), rng.normal(size=(n, q)).astype(np.float32)
    with pytest.raises(ValueError, match="degenerate"):
        cca(x, y)
    with pytest.raises(ValueError, match=rf"keep={keep} may keep all of them.*degenerate"):
        svcca(x, y, keep=keep)
    with pytest.raises(ValueError, match="degenerate"):
        jax.jit(svcca, static_argnames="keep")(x, y, keep=keep)


def test_svcca_integer_keep_measures_wide_layers():
    rng = np.random.default_rng(22)
    x, y = rng.normal(size=(200, 400)).astype(np.float32), rng.normal(size=(200, 300)).astype(np.float32)
    assert float(svcca(x, y, keep=10)) < 0.5  # independent noise
    rotation = np.linalg.qr(rng.normal(size=(400, 400)))[0].astype(np.float32)
    np.testing.assert_allclose(svcca(x, 3 * x @ rotation, keep=10), 1.0, atol=1e-3)


def test_svcca_fraction_warns_when_kept_directions_could_overlap():
    rng = np.random.default_rng(23)
    x, y = rng.normal(size=(2, 20, 12)).astype(np.float32)
    with pytest.warns(UserWarning, match="if all are kept, at least 5 canonical"):
        svcca(x, y)
