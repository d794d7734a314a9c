"""Permutation p-values of minibatch CKA: the null replicates against a float64 NumPy reference, the
p-values' calibration (uniform under independence, 1/(P + 1) under dependence), the biased
estimator's inflation in the null's mean, and equality across layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cka_jax import MinibatchCKA, minibatch_grams
from cka_jax._hsic_sums import NO_SCALE
from cka_jax._layer_grams import upper
from cka_jax._permutations import permuted_upper_index, replicate_keys
from tests import reference as ref


def _perms(acc, index, n):
    """The permutations (P, n) of minibatch `index` of an accumulator created like `acc`."""
    keys = replicate_keys(acc.key, jnp.array([index]), acc.num_permutations)[0]
    return np.stack([np.asarray(jax.random.permutation(jax.random.wrap_key_data(k), n)) for k in keys])


def _absolute(acc):
    """null_xy (P, Ma, Mb, La, Lb) in the activations' own units (float64)."""
    sa, sb = (np.where(s == NO_SCALE, 0, s).astype(np.float64) for s in (acc.log2_scale_a, acc.log2_scale_b))
    return np.asarray(acc.null_xy, np.float64) * 4.0 ** (sa[:, None, :, None] + sb[None, :, None, :])


def _acts(rng, n, widths):
    return [rng.standard_normal((n, p)).astype(np.float32) for p in widths]


@pytest.mark.parametrize("n", [4, 5, 9, 16])
def test_permuted_upper_index_permutes_rows_and_columns(n):
    rng = np.random.default_rng(n)
    g = rng.standard_normal((n, n))
    g = g + g.T
    for _ in range(5):
        perm = rng.permutation(n)
        got = np.asarray(upper(jnp.asarray(g)))[np.asarray(permuted_upper_index(jnp.asarray(perm)))]
        np.testing.assert_array_equal(got, np.asarray(upper(jnp.asarray(g[perm][:, perm]))))


def test_null_replicates_match_reference():
    """null_xy of every replicate = Σ_b HSIC₁(K_b, P_b L_b P_bᵀ), float64 NumPy from the formulas."""
    rng = np.random.default_rng(0)
    batches_a = [_acts(rng, 12, (5, 3)) for _ in range(3)]
    batches_b = [
        [a[0] + 0.5 * rng.standard_normal(a[0].shape).astype(np.float32), *_acts(rng, 12, (4,))] for a in batches_a
    ]
    acc = MinibatchCKA.create(2, 2, num_permutations=6, seed=3)
    for a, b in zip(batches_a, batches_b, strict=True):
        acc = acc.update(a, b)
    expected = np.zeros((6, 2, 2))
    for index, (a, b) in enumerate(zip(batches_a, batches_b, strict=True)):
        for r, perm in enumerate(_perms(acc, index, 12)):
            for i, x in enumerate(a):
                for j, y in enumerate(b):
                    expected[r, i, j] += ref.hsic1(ref.gram_linear(x), ref.gram_linear(y[perm]))
    np.testing.assert_allclose(_absolute(acc)[:, 0, 0], expected, rtol=1e-4, atol=1e-6)
    xx, yy = np.asarray(acc.xx)[0], np.asarray(acc.yy)[0]
    null_cka = np.asarray(acc.null_xy)[:, 0, 0] / np.sqrt(xx[:, None] * yy[None, :])
    np.testing.assert_allclose(acc.null_mean(), null_cka.mean(0), rtol=1e-5, atol=1e-6)
    p = (1 + (null_cka >= np.asarray(acc.result())[None]).sum(0)) / 7
    np.testing.assert_allclose(acc.p_values(), p, rtol=1e-6)
    p_row = (1 + (null_cka.max(-1) >= np.asarray(acc.result()).max(-1)[None]).sum(0)) / 7
    np.testing.assert_allclose(acc.row_max_p_values(), p_row, rtol=1e-6)


@pytest.mark.slow  # 300 accumulators
def test_independent_representations_give_uniform_p_values():
    """Kolmogorov-Smirnov against uniform over 300 seeds; the fraction below 0.05 near 5%."""
    p_values = []
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        acc = MinibatchCKA.create(1, 1, num_permutations=99, seed=seed)
        for _ in range(2):
            acc = acc.update(_acts(rng, 16, (6,)), _acts(rng, 16, (5,)))
        p_values.append(float(acc.p_values()[0, 0]))
    p_values = np.array(p_values)
    assert stats.kstest(p_values, "uniform").pvalue > 0.01
    assert 0.02 <= np.mean(p_values <= 0.05) <= 0.09
    counts = p_values * 100  # p = k / (P + 1), k in 1..P + 1
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    assert counts.min() > 0.99 and counts.max() < 100.01


def test_dependent_representations_give_the_smallest_p_value():
    rng = np.random.default_rng(1)
    acc = MinibatchCKA.create(2, 2, num_permutations=50)
    for _ in range(3):
        a = _acts(rng, 32, (10, 20))
        acc = acc.update(a, [2 * a[0] + 0.01 * rng.standard_normal(a[0].shape).astype(np.float32), a[1][:, ::-1]])
    p = np.asarray(acc.p_values())
    np.testing.assert_allclose(np.diagonal(p), [1 / 51, 1 / 51], rtol=1e-6)
    np.testing.assert_allclose(acc.row_max_p_values(), [1 / 51, 1 / 51], rtol=1e-6)
    assert np.all(p[[0, 1], [1, 0]] > 0.05)


def test_null_mean_near_zero_at_p_much_larger_than_n():
    """Independent data, 2000 features, 16 examples per minibatch: the biased CKA of each pair is
    inflated (0.99 here: the centred grams of n examples at p ≫ n are nearly multiples of H);
    the HSIC₁ null stays near 0."""
    rng = np.random.default_rng(2)
    acc = MinibatchCKA.create(1, 1, num_permutations=20)
    biased = []
    for _ in range(4):
        x, y = _acts(rng, 16, (2000,)), _acts(rng, 16, (2000,))
        acc = acc.update(x, y)
        biased.append(ref.cka(ref.gram_linear(x[0]), ref.gram_linear(y[0])))
    assert np.mean(biased) > 0.95
    assert abs(float(acc.null_mean()[0, 0])) < 0.05


def test_population_equals_pairs_and_within_model():
    rng = np.random.default_rng(4)
    batches = [
        (rng.standard_normal((3, 16, 6)).astype(np.float32), rng.standard_normal((2, 16, 4)).astype(np.float32))
        for _ in range(2)
    ]
    pop = MinibatchCKA.create(1, 1, num_models_a=3, num_models_b=2, num_permutations=9, seed=5)
    for a, b in batches:
        pop = pop.update([a], [b])
    for i in range(3):
        for j in range(2):
            pair = MinibatchCKA.create(1, 1, num_permutations=9, seed=5)
            for a, b in batches:
                pair = pair.update([a[i]], [b[j]])
            np.testing.assert_allclose(_absolute(pop)[:, i, j], _absolute(pair)[:, 0, 0], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(pop.p_values()[i, j], pair.p_values())
    within = MinibatchCKA.create(2, num_permutations=9, seed=5).update([batches[0][0][0], batches[0][0][1]])
    assert within.p_values().shape == (2, 2)
    assert float(within.p_values()[0, 0]) == pytest.approx(0.1)


def test_host_and_compiled_routes_agree():
    rng = np.random.default_rng(6)
    acts = [_acts(rng, 16, (6, 40)) for _ in range(2)]
    host = MinibatchCKA.create(2, 2, num_permutations=11, seed=1)
    compiled = MinibatchCKA.create(2, 2, num_permutations=11, seed=1)
    grams = MinibatchCKA.create(2, 2, num_permutations=11, seed=1)
    step = jax.jit(MinibatchCKA.update)
    for a in acts:
        b = [a[0] + rng.standard_normal(a[0].shape).astype(np.float32), a[1] ** 2]
        host, compiled = host.update(a, b), step(compiled, a, b)
        grams = grams.update_grams(minibatch_grams(a), minibatch_grams(b))
    for other in (compiled, grams):
        np.testing.assert_allclose(_absolute(other), _absolute(host), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(other.p_values(), host.p_values())


def test_merge_sharded_and_bootstrap():
    rng = np.random.default_rng(7)
    batches = [_acts(rng, 12, (5, 3, 4)) for _ in range(8)]
    serial = MinibatchCKA.create(3, num_permutations=5, num_bootstrap=3)
    for b in batches:
        serial = serial.update(b)
    mesh = jax.make_mesh((8,), ("batch",))
    stacked = [np.stack([b[l] for b in batches]) for l in range(3)]
    sharded = MinibatchCKA.create(3, num_permutations=5, num_bootstrap=3).update_sharded(stacked, mesh=mesh)
    np.testing.assert_allclose(_absolute(sharded), _absolute(serial), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sharded.p_values(), serial.p_values())
    assert serial.bootstrap_interval()[0].shape == (3, 3)
    one, two = (MinibatchCKA.create(3, num_permutations=5, seed=s) for s in (0, 1))
    for b in batches[:4]:
        one = one.update(b)
    for b in batches[4:]:
        two = two.update(b)
    merged = one.merge(two)
    np.testing.assert_allclose(_absolute(merged), _absolute(one) + _absolute(two), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.result(), serial.result(), rtol=1e-5)
    with pytest.raises(ValueError, match="different layouts"):
        one.merge(MinibatchCKA.create(3, num_permutations=4))


def test_undefined_entries_and_misuse():
    rng = np.random.default_rng(8)
    acc = MinibatchCKA.create(2, 1, num_permutations=5)
    acc = acc.update([np.ones((8, 3), np.float32), _acts(rng, 8, (3,))[0]], _acts(rng, 8, (4,)))
    p = np.asarray(acc.p_values())
    assert np.isnan(p[0, 0]) and 0 < p[1, 0] <= 1
    assert np.isnan(acc.null_mean()[0, 0]) and np.isnan(acc.row_max_p_values()[0])
    with pytest.raises(ValueError, match="num_permutations"):
        MinibatchCKA.create(2, num_permutations=-1)
    for method in ("p_values", "null_mean", "row_max_p_values"):
        with pytest.raises(ValueError, match="num_permutations > 0"):
            getattr(MinibatchCKA.create(2), method)()


def test_compare_p_values_save_load_and_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from cka_jax import compare, load_comparison

    rng = np.random.default_rng(9)
    batches = []
    for _ in range(3):
        x = rng.standard_normal((16, 8)).astype(np.float32)
        batches.append(({"a": x, "noise": rng.standard_normal((16, 5)).astype(np.float32)}, {"b": 3 * x}))
    result = compare(None, batches=batches, num_permutations=19, progress=False)
    acc = MinibatchCKA.create(2, 1, num_permutations=19)
    for a, b in batches:
        acc = acc.update(list(a.values()), list(b.values()))
    np.testing.assert_allclose(result.p_values, acc.p_values(), rtol=1e-6)
    assert result.p_values[0, 0] == pytest.approx(1 / 20)
    result.save(tmp_path / "c.npz")
    back = load_comparison(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.p_values, result.p_values)
    assert back.num_permutations == 19 and "permutation p-values" in repr(back)
    fig = result.plot(alpha=0.05)
    assert len(fig.axes[0].collections) == int(np.sum(result.p_values > 0.05) > 0)
    with pytest.raises(ValueError, match="num_permutations"):
        compare(None, batches=batches, progress=False).plot(alpha=0.05)
    with pytest.raises(ValueError, match="debiased=False"):
        compare(None, batches=batches, num_permutations=5, debiased=False, progress=False)
