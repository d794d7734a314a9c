"""The exact power-of-two scaling every measure relies on, against NumPy's ldexp and frexp, for
every exponent of float32 and float64 and the values at the edges of their ranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cka_jax._scaling import pow2, scale_exponent, times_pow2


def _values(dtype) -> np.ndarray:
    """Normal values of every magnitude, both signs, the edges of the range, 0 and -0."""
    info = np.finfo(dtype)
    rng = np.random.default_rng(0)
    exponents = rng.integers(info.minexp, info.maxexp, 60)
    normal = rng.uniform(1, 2, 60) * np.exp2(exponents.astype(np.float64)) * rng.choice([-1, 1], 60)
    edges = [info.tiny, info.max, -info.max, 1.0, 3.0, 0.75, 0.0, -0.0]
    return np.concatenate([normal.astype(dtype), np.array(edges, dtype)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_times_pow2_is_ldexp_wherever_the_result_is_normal(dtype):
    info = np.finfo(dtype)
    x = _values(dtype)
    k = np.arange(3 * info.minexp - 8, 3 * (info.maxexp - 1) + 9)  # beyond the clip at both ends
    with jax.enable_x64(dtype == np.float64):
        got = np.asarray(times_pow2(jnp.asarray(x)[:, None], jnp.asarray(k)[None]))
    assert got.dtype == dtype
    clipped = np.clip(k, 3 * info.minexp, 3 * (info.maxexp - 1))[None]
    with np.errstate(over="ignore", under="ignore"):
        expected = np.ldexp(x[:, None], clipped)
    exponent = np.frexp(x)[1][:, None] + clipped  # x·2^k = f·2^exponent, f in [0.5, 1)
    normal = (x[:, None] != 0) & (exponent > info.minexp) & (exponent <= info.maxexp)  # tiny = 2^minexp
    np.testing.assert_array_equal(got[normal], expected[normal])
    # Below the normal range XLA:CPU flushes to zero; above it, inf (both keep the sign).
    assert np.all(np.abs(got[(x[:, None] != 0) & (exponent <= info.minexp)]) < info.tiny)
    assert np.all(np.isinf(got[(x[:, None] != 0) & (exponent > info.maxexp)]))
    assert np.all(got[x == 0] == 0)
    signs = np.broadcast_to(np.signbit(x)[:, None], got.shape)
    np.testing.assert_array_equal(np.signbit(got), signs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_times_pow2_propagates_nan_and_inf(dtype):
    x = jnp.asarray(np.array([np.nan, np.inf, -np.inf], dtype))
    with jax.enable_x64(dtype == np.float64):
        for k in (-1000, 0, 1000):
            got = np.asarray(times_pow2(x, k))
            assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pow2_is_exact_and_clipped_to_the_normal_range(dtype):
    info = np.finfo(dtype)
    k = np.arange(info.minexp - 5, info.maxexp + 5)
    with jax.enable_x64(dtype == np.float64):
        got = np.asarray(pow2(jnp.asarray(k), dtype))
    np.testing.assert_array_equal(got, np.exp2(np.clip(k, info.minexp, info.maxexp - 1)).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scale_exponent_brings_a_normal_magnitude_into_2_to_4(dtype):
    info = np.finfo(dtype)
    magnitude = np.abs(_values(dtype))
    invalid = np.array([0.0, info.tiny / 2, info.smallest_subnormal, np.inf, np.nan, -1.0], dtype)
    with jax.enable_x64(dtype == np.float64):
        k, valid = (np.asarray(a) for a in scale_exponent(jnp.asarray(np.concatenate([magnitude, invalid]))))
    assert k.dtype == np.int32
    np.testing.assert_array_equal(valid, np.concatenate([magnitude > 0, np.zeros(len(invalid), bool)]))
    scaled = np.ldexp(magnitude[magnitude > 0], -k[: len(magnitude)][magnitude > 0])
    assert np.all((scaled >= 2) & (scaled < 4)), scaled
    _, e = np.frexp(magnitude[magnitude > 0])
    np.testing.assert_array_equal(k[: len(magnitude)][magnitude > 0], e - 2)
    assert np.all(k[~valid] == 0)
