"""MinibatchCKA against the float64 reference; population, sharded, merge, bootstrap, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import reference as ref

import cka_jax as ck
from cka_jax import MinibatchCKA


def _model_acts(num_batches, batch, rng, widths=(6, 10, 4), depth_noise=0.5):
    """Activations of a toy 'network': layer l = tanh(previous @ W_l) + noise, for each minibatch."""
    weights = []
    prev = 5
    for w in widths:
        weights.append(rng.normal(size=(prev, w)) / np.sqrt(prev))
        prev = w
    batches = []
    for _ in range(num_batches):
        h = rng.normal(size=(batch, 5))
        layers = []
        for w in weights:
            h = np.tanh(h @ w) + depth_noise * rng.normal(size=(batch, w.shape[1]))
            layers.append(h.astype(np.float32))
        batches.append(layers)
    return batches


def _accumulate(acc, batches_a, batches_b=None):
    for i, acts_a in enumerate(batches_a):
        acc = acc.update(acts_a, None if batches_b is None else batches_b[i])
    return acc


def test_within_model_matches_reference():
    batches = _model_acts(5, 32, np.random.default_rng(0))
    acc = _accumulate(MinibatchCKA.create(3), batches)
    np.testing.assert_allclose(acc.result(), ref.minibatch_cka(batches, batches), rtol=1e-4, atol=1e-5)
    assert int(acc.count) == 5
    np.testing.assert_allclose(np.diag(acc.result()), 1.0, rtol=1e-6)


def test_cross_model_matches_reference_and_accepts_mappings():
    rng = np.random.default_rng(1)
    batches_a = _model_acts(4, 24, rng)
    batches_b = [[np.tanh(a[0] @ rng.normal(size=(6, 9))).astype(np.float32), a[2] + 0.3] for a in batches_a]
    acc = MinibatchCKA.create(3, 2)
    for a, b in zip(batches_a, batches_b, strict=True):
        acc = acc.update({"conv": a[0], "block": a[1], "logits": a[2]}, {"x": b[0], "y": b[1]})
    assert acc.result().shape == (3, 2)
    np.testing.assert_allclose(acc.result(), ref.minibatch_cka(batches_a, batches_b), rtol=1e-4, atol=1e-5)


def test_rbf_kernel_matches_reference():
    batches = _model_acts(3, 20, np.random.default_rng(2))
    acc = _accumulate(MinibatchCKA.create(3, kernel="rbf", threshold=0.8), batches)
    expected = ref.minibatch_cka(batches, batches, gram=lambda x: ref.gram_rbf(x, 0.8))
    np.testing.assert_allclose(acc.result(), expected, rtol=1e-4, atol=1e-5)


def test_single_minibatch_equals_debiased_cka():
    (acts,) = _model_acts(1, 40, np.random.default_rng(3))
    got = MinibatchCKA.create(3).update(acts).result()
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], ck.linear_cka(acts[i], acts[j], debiased=True), rtol=1e-4)


def test_float32_accuracy_at_scale():
    """n = 10,000 in 40 minibatches of 250, activations of scale 1e3: within 1e-4 of float64."""
    rng = np.random.default_rng(4)
    batches = [[1e3 * (a + 1.0) for a in layers] for layers in _model_acts(40, 250, rng, widths=(32, 64, 48))]
    acc = jax.jit(MinibatchCKA.update)
    state = MinibatchCKA.create(3)
    for layers in batches:
        state = acc(state, layers)
    np.testing.assert_allclose(state.result(), ref.minibatch_cka(batches, batches), atol=1e-4)


def _population(m, num_batches, batch, seed, widths=(6, 10, 4)):
    """(num_batches, layers) lists of (m, batch, width) arrays: m different toy models, same inputs."""
    rng = np.random.default_rng(seed)
    per_model = [_model_acts(num_batches, batch, np.random.default_rng(seed + 100 * i), widths) for i in range(m)]
    del rng
    return [[np.stack([per_model[i][b][l] for i in range(m)]) for l in range(len(widths))] for b in range(num_batches)]


def test_population_equals_pairwise_loop():
    pop = _population(3, 3, 16, seed=5)
    acc = _accumulate(MinibatchCKA.create(3, num_models_a=3), pop)
    heatmaps = acc.result()
    assert heatmaps.shape == (3, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            pair = MinibatchCKA.create(3)
            for layers in pop:
                pair = pair.update([a[i] for a in layers], [a[j] for a in layers])
            np.testing.assert_allclose(heatmaps[i, j], pair.result(), rtol=1e-5, atol=1e-6)


def test_two_populations():
    pop_a = _population(2, 3, 16, seed=6)
    pop_b = _population(4, 3, 16, seed=7, widths=(5, 7))
    acc = MinibatchCKA.create(3, 2, num_models_a=2, num_models_b=4)
    acc = _accumulate(acc, pop_a, pop_b)
    assert acc.result().shape == (2, 4, 3, 2)
    batches_a = [[a[1] for a in layers] for layers in pop_a]
    batches_b = [[b[3] for b in layers] for layers in pop_b]
    np.testing.assert_allclose(acc.result()[1, 3], ref.minibatch_cka(batches_a, batches_b), rtol=1e-4, atol=1e-5)


def test_population_grams_in_chunks_equal_update():
    pop = _population(4, 2, 16, seed=8)
    direct = _accumulate(MinibatchCKA.create(3, num_models_a=4), pop)
    chunked = MinibatchCKA.create(3, num_models_a=4)
    for layers in pop:
        grams = [ck.minibatch_grams([a[s] for a in layers], population=True) for s in (slice(0, 2), slice(2, 4))]
        chunked = chunked.update_grams(jnp.concatenate(grams))
    np.testing.assert_allclose(chunked.result(), direct.result(), rtol=1e-6, atol=1e-7)  # grams built apart
    single = MinibatchCKA.create(3).update_grams(ck.minibatch_grams([a[0] for a in pop[0]]))
    np.testing.assert_allclose(
        single.result(), MinibatchCKA.create(3).update([a[0] for a in pop[0]]).result(), rtol=1e-6
    )


@pytest.mark.slow  # compiles two programs of 100 x 20 layers
def test_population_of_100_models_20_layers_fits_one_accelerator():
    """Compiled memory of one update (batch 256) from chunk-built grams, and from activations."""
    acc = MinibatchCKA.create(20, num_models_a=100)
    grams = jax.ShapeDtypeStruct((100, 20, 256, 256), jnp.float32)
    stats = jax.jit(MinibatchCKA.update_grams).lower(acc, grams).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 2**30
    acts = [jax.ShapeDtypeStruct((100, 256, 8, 8, 64), jnp.float32)] * 20
    stats = jax.jit(MinibatchCKA.update).lower(acc, acts).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 4 * 2**30


@pytest.mark.slow
@pytest.mark.parametrize("num_bootstrap", [0, 8])
def test_sharded_equals_unsharded(num_bootstrap):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("batch",))
    batches = _model_acts(16, 12, np.random.default_rng(9))
    stacked = [np.stack([b[l] for b in batches]) for l in range(3)]
    serial = _accumulate(MinibatchCKA.create(3, num_bootstrap=num_bootstrap), batches)
    sharded = jax.jit(lambda a, x: a.update_sharded(x, mesh=mesh))(
        MinibatchCKA.create(3, num_bootstrap=num_bootstrap), stacked
    )
    assert int(sharded.count) == 16
    for field in ("xy", "xx", "yy", "boot_xy", "boot_xx", "boot_yy"):
        np.testing.assert_allclose(getattr(sharded, field), getattr(serial, field), rtol=1e-5)
    # continuing serially after a sharded update keeps the same bootstrap stream
    extra = _model_acts(1, 12, np.random.default_rng(10))[0]
    np.testing.assert_allclose(sharded.update(extra).boot_xy, serial.update(extra).boot_xy, rtol=1e-5)


@pytest.mark.slow
def test_sharded_population_and_cross_model():
    mesh = jax.make_mesh((4, 2), ("batch", "model"))
    pop_a = _population(2, 8, 12, seed=11)
    pop_b = _population(3, 8, 12, seed=12, widths=(5, 7))

    def stack(pop):
        return {f"layer{l}": np.stack([b[l] for b in pop]) for l in range(len(pop[0]))}

    acc = MinibatchCKA.create(3, 2, num_models_a=2, num_models_b=3)
    sharded = acc.update_sharded(stack(pop_a), stack(pop_b), mesh=mesh)
    np.testing.assert_allclose(sharded.result(), _accumulate(acc, pop_a, pop_b).result(), rtol=1e-5)


def test_sharded_errors():
    mesh = jax.make_mesh((8,), ("batch",))
    acts = [np.ones((6, 12, 3), np.float32)] * 3
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        MinibatchCKA.create(3).update_sharded(acts, mesh=mesh)


def test_merge_equals_accumulating_both():
    batches = _model_acts(6, 16, np.random.default_rng(13))
    a = _accumulate(MinibatchCKA.create(3, num_bootstrap=4, seed=0), batches[:2])
    b = _accumulate(MinibatchCKA.create(3, num_bootstrap=4, seed=1), batches[2:])
    both = _accumulate(MinibatchCKA.create(3), batches)
    merged = a.merge(b)
    assert int(merged.count) == 6
    np.testing.assert_allclose(merged.result(), both.result(), rtol=1e-6)
    np.testing.assert_allclose(merged.boot_xy, a.boot_xy + b.boot_xy, rtol=1e-6)
    with pytest.raises(ValueError, match="same seed"):
        a.merge(a)
    with pytest.raises(ValueError, match="different layouts"):
        a.merge(MinibatchCKA.create(2, num_bootstrap=4, seed=3))
    with pytest.raises(ValueError, match="different layouts"):
        both.merge(MinibatchCKA.create(3, kernel="rbf"))


def test_jit_and_eager_agree():
    batches = _model_acts(3, 16, np.random.default_rng(14))
    eager = _accumulate(MinibatchCKA.create(3, num_bootstrap=3), batches)
    step = jax.jit(MinibatchCKA.update)
    jitted = MinibatchCKA.create(3, num_bootstrap=3)
    for layers in batches:
        jitted = step(jitted, layers)
    np.testing.assert_allclose(jitted.result(), eager.result(), rtol=1e-6)
    np.testing.assert_allclose(jitted.boot_xy, eager.boot_xy, rtol=1e-6)


def test_bootstrap_interval():
    batches = _model_acts(64, 16, np.random.default_rng(15))
    few = _accumulate(MinibatchCKA.create(3, num_bootstrap=200), batches[:8])
    many = _accumulate(MinibatchCKA.create(3, num_bootstrap=200), batches)
    for acc in (few, many):
        low, high = acc.bootstrap_interval(0.9)
        est = acc.result()
        assert np.all(low <= est + 1e-6) and np.all(est <= high + 1e-6)
        assert acc.bootstrap_samples().shape == (200, 3, 3)

    def width(acc):
        low, high = acc.bootstrap_interval()
        return np.asarray(high - low)

    off_diag = ~np.eye(3, dtype=bool)
    assert np.all(width(many)[off_diag] < width(few)[off_diag])
    with pytest.raises(ValueError, match="num_bootstrap > 0"):
        MinibatchCKA.create(3).bootstrap_interval()


def test_constant_layer_and_nonfinite_inputs_give_nan():
    batches = _model_acts(3, 16, np.random.default_rng(16))
    batches = [[a, np.full_like(b, 2.5), c] for a, b, c in batches]
    res = np.asarray(_accumulate(MinibatchCKA.create(3), batches).result())
    assert np.all(np.isnan(res[1])) and np.all(np.isnan(res[:, 1]))
    assert np.all(np.isfinite(res[np.ix_([0, 2], [0, 2])]))
    bad = [[a, b.copy(), c] for a, b, c in _model_acts(2, 16, np.random.default_rng(17))]
    bad[1][1][3, 2] = np.nan
    res = np.asarray(_accumulate(MinibatchCKA.create(3), bad).result())
    assert np.all(np.isnan(res[1])) and np.isfinite(res[0, 2])
    assert np.all(np.isnan(MinibatchCKA.create(3).result()))


def test_bad_input_errors():
    (acts,) = _model_acts(1, 16, np.random.default_rng(18))
    acc = MinibatchCKA.create(3)
    with pytest.raises(ValueError, match=r"acts_a\[2\] has shape \(15, 4\)"):
        acc.update([acts[0], acts[1], acts[2][:15]])
    with pytest.raises(ValueError, match=r"acts_a\['logits'\] must have shape \(batch, \.\.\.\)"):
        acc.update({"a": acts[0], "b": acts[1], "logits": acts[2][:, 0]})
    with pytest.raises(ValueError, match="at least 4 examples"):
        acc.update([a[:3] for a in acts])
    with pytest.raises(ValueError, match="empty"):
        acc.update([])
    with pytest.raises(ValueError, match="has 2 layers, the accumulator expects 3"):
        acc.update(acts[:2])
    with pytest.raises(ValueError, match="acts_b is required"):
        MinibatchCKA.create(3, 2).update(acts)
    with pytest.raises(ValueError, match="same minibatch"):
        MinibatchCKA.create(3, 3).update(acts, [a[:8] for a in acts])
    with pytest.raises(ValueError, match=r"\(4 models, batch, \.\.\.\)"):
        MinibatchCKA.create(3, num_models_a=4).update([np.stack([a] * 3) for a in acts])
    with pytest.raises(ValueError, match="unknown kernel 'cosine'"):
        MinibatchCKA.create(3, kernel="cosine")
    with pytest.raises(ValueError, match="num_layers_a must be a positive integer, got 0"):
        MinibatchCKA.create(0)
    with pytest.raises(ValueError, match="num_models_b needs num_models_a"):
        MinibatchCKA.create(3, num_models_b=2)
    with pytest.raises(ValueError, match=r"grams_a must have shape \(3, 'n', 'n'\)"):
        acc.update_grams(np.zeros((2, 16, 16)))
    # errors are raised at trace time under jit too
    with pytest.raises(ValueError, match=r"acts_a\[2\] has shape"):
        jax.jit(MinibatchCKA.update)(acc, [acts[0], acts[1], acts[2][:15]])


def test_save_and_restore(tmp_path):
    batches = _model_acts(2, 16, np.random.default_rng(19))
    acc = _accumulate(MinibatchCKA.create(3, num_bootstrap=4), batches)
    np.savez(tmp_path / "acc.npz", *jax.tree.leaves(acc))
    with np.load(tmp_path / "acc.npz") as f:
        leaves = [f[f"arr_{i}"] for i in range(len(f.files))]
    restored = jax.tree.unflatten(jax.tree.structure(MinibatchCKA.create(3, num_bootstrap=4)), leaves)
    np.testing.assert_array_equal(restored.result(), acc.result())
    with ocp.CheckpointManager(tmp_path / "orbax") as manager:
        manager.save(1, args=ocp.args.StandardSave(acc))
        manager.wait_until_finished()
        back = manager.restore(1, args=ocp.args.StandardRestore(MinibatchCKA.create(3, num_bootstrap=4)))
    assert isinstance(back, MinibatchCKA)
    np.testing.assert_array_equal(back.boot_xy, acc.boot_xy)
    # restored accumulators keep accumulating
    np.testing.assert_allclose(back.update(batches[0]).result(), acc.update(batches[0]).result(), rtol=1e-6)


def test_float64_accumulators_with_x64():
    batches = _model_acts(2, 16, np.random.default_rng(20))
    with jax.enable_x64(True):
        acc = _accumulate(MinibatchCKA.create(3), [[a.astype(np.float64) for a in b] for b in batches])
        assert acc.xy.dtype == jnp.float64
        res = np.asarray(acc.result())
    np.testing.assert_allclose(res, ref.minibatch_cka(batches, batches), rtol=1e-10)


@pytest.fixture
def small_feature_chunks(monkeypatch):
    """256 features per chunk at batch 16. Compiled programs are dropped before (they would keep
    the old chunk size) and after (later tests would get the small one)."""
    import cka_jax._layer_grams

    monkeypatch.setattr(cka_jax._layer_grams, "CHUNK_ELEMENTS", 16 * 256)
    jax.clear_caches()
    yield
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.slow  # drops every compiled program, which the tests after it compile again
def test_feature_chunked_grams_match_reference(small_feature_chunks):
    """Wide layers are reduced over bounded feature chunks (with a remainder chunk): same result."""
    batches = [
        [1e3 * (a + 1.0) for a in layers]
        for layers in _model_acts(3, 16, np.random.default_rng(21), widths=(600, 256, 40))
    ]
    acc = _accumulate(MinibatchCKA.create(3), batches)
    np.testing.assert_allclose(acc.result(), ref.minibatch_cka(batches, batches), atol=1e-5)


@pytest.mark.parametrize("num_batches", [2, 3, 5, 8])
def test_bootstrap_interval_is_finite_from_two_minibatches(num_batches):
    """Poisson(1) weights leave a replicate empty (0/0) with probability e^-count: 13.5% of the
    replicates at 2 minibatches, which made every interval NaN. Exponential weights never do."""
    batches = _model_acts(num_batches, 16, np.random.default_rng(22))
    acc = _accumulate(MinibatchCKA.create(3, num_bootstrap=200), batches)
    low, high = (np.asarray(a) for a in acc.bootstrap_interval(0.9))
    assert np.all(np.isfinite(low)) and np.all(np.isfinite(high))
    assert np.all(np.isfinite(acc.bootstrap_samples()))
    est = np.asarray(acc.result())
    assert np.all(low <= est + 1e-6) and np.all(est <= high + 1e-6)


BOOTSTRAP_UNDEFINED = {
    "one-minibatch": lambda batches: batches[:1],
    "nan-in-data": lambda batches: [batches[0], [np.full_like(batches[1][0], np.nan)] + batches[1][1:]],
}


@pytest.mark.parametrize("case", BOOTSTRAP_UNDEFINED, ids=BOOTSTRAP_UNDEFINED.keys())
def test_bootstrap_interval_is_nan_where_undefined(case):
    batches = BOOTSTRAP_UNDEFINED[case](_model_acts(3, 16, np.random.default_rng(23)))
    acc = _accumulate(MinibatchCKA.create(3, num_bootstrap=50), batches)
    low, high = (np.asarray(a) for a in acc.bootstrap_interval())
    rows = slice(None) if case == "one-minibatch" else 0  # NaN data: the damaged layer's row
    assert np.all(np.isnan(low[rows])) and np.all(np.isnan(high[rows]))
    if case == "nan-in-data":
        assert np.all(np.isfinite(low[1:, 1:])) and np.all(np.isfinite(high[1:, 1:]))


def test_bootstrap_interval_under_vmap_and_jit():
    """As analysis/within.py uses it: one accumulator per model, vmapped."""
    batches = _model_acts(2, 16, np.random.default_rng(24))
    empty = MinibatchCKA.create(3, num_bootstrap=20)
    accs = jax.tree.map(lambda a: jnp.broadcast_to(a, (2,) + a.shape), empty)
    step = jax.jit(jax.vmap(MinibatchCKA.update))
    for layers in batches:
        accs = step(accs, [np.stack([a, a[::-1] * 3]) for a in layers])
    low, high = jax.jit(jax.vmap(lambda a: a.bootstrap_interval()))(accs)
    assert low.shape == (2, 3, 3) and np.all(np.isfinite(low)) and np.all(np.isfinite(high))
