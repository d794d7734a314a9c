"""Grams, centering, HSIC and whole-representation CKA against the float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from scipy.stats import ortho_group

import cka_jax as ck


def _pair(n=40, p=12, q=9, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    y = np.tanh(x @ rng.normal(size=(p, q))) + noise * rng.normal(size=(n, q))
    return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("unbiased", [False, True])
def test_hsic_matches_formulas(unbiased):
    x, y = _pair()
    k, l = ref.gram_linear(x), ref.gram_linear(y)
    expected = ref.hsic1(k, l) if unbiased else ref.hsic0(k, l)
    got = ck.hsic(ck.gram_linear(x), ck.gram_linear(y), unbiased=unbiased)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_ucentering_identity_and_centering_values():
    """<U(K), U(L)>/(n(n-3)) is the printed HSIC₁ for any symmetric grams, not only linear ones."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 15, 15))
    k, l = a + a.T, b @ b.T
    got = np.sum(np.asarray(ck.center_gram(k, unbiased=True) * ck.center_gram(l, unbiased=True))) / (15 * 12)
    np.testing.assert_allclose(got, ref.hsic1(k, l), rtol=1e-4)
    h = np.eye(15) - 1 / 15
    np.testing.assert_allclose(ck.center_gram(k), h @ k @ h, atol=1e-5)
    u = np.asarray(ck.center_gram(k, unbiased=True))
    assert np.all(np.diag(u) == 0)


def test_gram_linear_differs_from_xxT_only_by_what_centering_removes():
    x, _ = _pair()
    x = x + 100.0
    h = np.eye(40) - 1 / 40
    expected = h @ ref.gram_linear(x) @ h
    np.testing.assert_allclose(ck.center_gram(ck.gram_linear(x)), expected, atol=1e-4)
    np.testing.assert_allclose(ck.gram_linear(x), ref.gram_linear(x - x.mean(0)), rtol=1e-4, atol=1e-4)


def test_gram_rbf_matches_reference():
    x, _ = _pair(n=25)
    np.testing.assert_allclose(ck.gram_rbf(x, 0.5), ref.gram_rbf(x, 0.5), atol=1e-5)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", [(60, 5, 7), (30, 80, 50)], ids=["feature-space", "gram"])
def test_linear_cka_matches_reference_in_both_forms(debiased, shape):
    n, p, q = shape
    x, y = _pair(n, p, q)
    expected = ref.cka(ref.gram_linear(x), ref.gram_linear(y), debiased)
    np.testing.assert_allclose(ck.linear_cka(x, y, debiased=debiased), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ck.cka(ck.gram_linear(x), ck.gram_linear(y), debiased), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 1.0, 2.0])
def test_rbf_cka_matches_reference(debiased, threshold):
    x, y = _pair(n=30)
    expected = ref.cka(ref.gram_rbf(x, threshold), ref.gram_rbf(y, threshold), debiased)
    np.testing.assert_allclose(ck.rbf_cka(x, y, threshold, debiased), expected, rtol=1e-4, atol=1e-5)


def test_trailing_dims_are_flattened():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 3, 4, 2)).astype(np.float32)
    y = rng.normal(size=(20, 5)).astype(np.float32)
    np.testing.assert_allclose(ck.linear_cka(x, y), ck.linear_cka(x.reshape(20, -1), y), rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [ck.linear_cka, lambda x, y: ck.linear_cka(x, y, debiased=True), ck.rbf_cka],
    ids=["linear", "linear-debiased", "rbf"],
)
def test_invariances(fn):
    x, y = _pair(n=50, p=6, q=40)
    base = fn(x, y)
    qx = ortho_group.rvs(6, random_state=0).astype(np.float32)
    qy = ortho_group.rvs(40, random_state=1).astype(np.float32)
    np.testing.assert_allclose(fn(x @ qx, y @ qy), base, rtol=1e-4)
    np.testing.assert_allclose(fn(3.7 * x, 0.02 * y), base, rtol=1e-4)
    np.testing.assert_allclose(fn(x + 5.0, y - 2.0), base, rtol=1e-3)
    np.testing.assert_allclose(fn(y, x), base, rtol=1e-5)
    np.testing.assert_allclose(fn(x, x), 1.0, rtol=1e-5)


def test_linear_cka_is_not_invariant_to_arbitrary_linear_maps():
    x, y = _pair(n=50, p=6)
    a = np.diag([10.0, 1, 1, 1, 1, 0.1]).astype(np.float32)
    assert abs(float(ck.linear_cka(x @ a, y)) - float(ck.linear_cka(x, y))) > 1e-2


def test_independent_gaussians_biased_positive_debiased_near_zero():
    rng = np.random.default_rng(3)
    biased, debiased = [], []
    for _ in range(20):
        x, y = rng.normal(size=(2, 20, 100)).astype(np.float32)
        biased.append(float(ck.linear_cka(x, y)))
        debiased.append(float(ck.linear_cka(x, y, debiased=True)))
    assert np.mean(biased) > 0.5
    assert abs(np.mean(debiased)) < 0.05


@pytest.mark.parametrize(
    "fn",
    [ck.linear_cka, lambda x, y: ck.linear_cka(x, y, debiased=True), ck.rbf_cka],
    ids=["linear", "linear-debiased", "rbf"],
)
def test_constant_representation_and_nonfinite_inputs_give_nan(fn):
    x, y = _pair(n=30, p=4, q=50)
    assert np.isnan(fn(np.full_like(x, 3.0), y))
    assert np.isnan(fn(x, np.zeros_like(y)))
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[3, 1] = bad
        assert np.isnan(fn(x_bad, y))
        y_bad = y.copy()
        y_bad[0, 0] = bad
        assert np.isnan(fn(x, y_bad))


def test_bad_input_errors_name_the_shapes():
    x, y = _pair(n=10)
    with pytest.raises(ValueError, match=r"\(10, 12\).*\(9, 9\)"):
        ck.linear_cka(x, y[:9])
    with pytest.raises(ValueError, match="n >= 4"):
        ck.linear_cka(x[:3], y[:3], debiased=True)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        ck.rbf_cka(x[:, 0], y)
    with pytest.raises(ValueError, match="square"):
        ck.center_gram(np.ones((4, 5)))
    with pytest.raises(ValueError, match="same shape"):
        ck.cka(np.eye(4), np.eye(5))


def test_jit_agrees_with_eager():
    x, y = _pair()
    for debiased in (False, True):
        np.testing.assert_allclose(
            jax.jit(ck.linear_cka, static_argnums=2)(x, y, debiased), ck.linear_cka(x, y, debiased), rtol=1e-6
        )
    np.testing.assert_allclose(jax.jit(ck.rbf_cka)(x, y), ck.rbf_cka(x, y), rtol=1e-6)


@pytest.mark.slow  # 10,000 examples, and float64 references of 1,500 x 1,500 grams
def test_float32_accuracy_at_scale():
    """n = 10,000 examples of scale 1e3 with large means: float32 within 1e-4 of float64."""
    rng = np.random.default_rng(4)
    n = 10_000
    z = rng.normal(size=(n, 8))
    x = 1e3 * (z @ rng.normal(size=(8, 64)) + rng.normal(size=(n, 64))) + 1e3
    y = 1e3 * (np.tanh(z @ rng.normal(size=(8, 48))) + rng.normal(size=(n, 48))) - 5e2
    xc, yc = x - x.mean(0), y - y.mean(0)
    xty, xtx, yty = (np.sum((a.T @ b) ** 2) for a, b in ((xc, yc), (xc, xc), (yc, yc)))
    np.testing.assert_allclose(
        ck.linear_cka(x.astype(np.float32), y.astype(np.float32)), xty / np.sqrt(xtx * yty), atol=1e-4
    )
    xs, ys = x[:1500, :40], y[:1500]
    for debiased in (False, True):
        expected = ref.cka(ref.gram_linear(xs), ref.gram_linear(ys), debiased)
        np.testing.assert_allclose(
            ck.linear_cka(xs.astype(np.float32), ys.astype(np.float32), debiased), expected, atol=1e-4
        )


def test_float64_with_x64():
    x, y = _pair()
    with jax.enable_x64(True):
        got = ck.linear_cka(x.astype(np.float64), y.astype(np.float64), debiased=True)
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, ref.cka(ref.gram_linear(x), ref.gram_linear(y), True), rtol=1e-10)
