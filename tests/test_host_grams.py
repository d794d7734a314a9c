"""Grams built on the host (`cka_jax._host_grams`) against compiled code and the float64 reference:
every route a layer can take (raw gram, host-shifted gram, compiled shifted gram, compiled raw
gram with its fallback) gives the same CKA, and the route is the one intended."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from threadpoolctl import threadpool_info

from cka_jax import MinibatchCKA
from cka_jax._host_grams import host_side, ucentre_in_place
from cka_jax._hsic import ucenter
from cka_jax._hsic_sums import batch_hsic
from cka_jax._layer_grams import AUTO, CENTRED, MAX_OFFSET_RATIO, SHIFTED, upper

N = 24


def _layers(seed, offsets=(0.0, 0.0, 0.0), scales=(1.0, 1.0, 1.0), models=None, widths=(7, 30, 5)):
    """Correlated ReLU-like layers of one minibatch, float32, with an offset and scale per layer."""
    rng = np.random.default_rng(seed)
    lead = (N,) if models is None else (models, N)
    base = rng.normal(size=lead + (4,))
    out = []
    for width, offset, scale in zip(widths, offsets, scales, strict=True):
        h = np.maximum(base @ rng.normal(size=(4, width)) + 0.3 * rng.normal(size=lead + (width,)), 0)
        out.append(((h + offset) * scale).astype(np.float32))
    return out


def _batches(count, seed, **kwargs):
    return [_layers(seed + i, **kwargs) for i in range(count)]


def _items(layers):
    return [(f"layer{l}", a) for l, a in enumerate(layers)]


def _loop(update, batches_a, batches_b, acc):
    for a, b in zip(batches_a, batches_b, strict=True):
        acc = update(acc, a, b)
    return acc


def _eager_and_compiled(batches_a, batches_b, **create):
    """Heatmaps of an eager update loop on NumPy arrays (host grams) and of the same loop under
    jax.jit (compiled grams)."""
    acc = MinibatchCKA.create(3, 3, **create)
    eager = _loop(lambda acc, a, b: acc.update(a, b), batches_a, batches_b, acc)
    jitted = jax.jit(MinibatchCKA.update)
    compiled = _loop(jitted, [[jnp.asarray(x) for x in a] for a in batches_a], batches_b, acc)
    return np.asarray(eager.result()), np.asarray(compiled.result())


def test_ucentre_in_place_equals_ucenter():
    gram = np.asarray(_layers(0)[1] @ _layers(0)[1].T, np.float64)
    with jax.enable_x64(True):
        expected = np.asarray(ucenter(jnp.asarray(gram), True))
    ucentre_in_place(gram, gram.sum(axis=0))
    np.testing.assert_allclose(gram, expected, rtol=1e-12, atol=1e-12)


def test_packed_hsic_equals_the_full_inner_product():
    rng = np.random.default_rng(1)
    grams = [np.asarray(ucenter(jnp.asarray(x @ x.T), True)) for x in (rng.normal(size=(N, 5)) for _ in range(4))]
    stacked = np.stack(grams)[None]  # (1, 4, N, N)
    sums = batch_hsic(upper(jnp.asarray(stacked[:, :2])), upper(jnp.asarray(stacked[:, 2:])))
    full = np.einsum("aij,bij->ab", stacked[0, :2], stacked[0, 2:]) / (N * (N - 3))
    np.testing.assert_allclose(sums.xy[0, 0], full, rtol=1e-5)
    np.testing.assert_allclose(
        sums.xx[0], np.einsum("aij,aij->a", stacked[0, :2], stacked[0, :2]) / (N * (N - 3)), rtol=1e-5
    )


@pytest.mark.parametrize(
    ("offsets", "scales", "modes"),
    [
        ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (CENTRED,) * 3),  # raw grams
        ((0.0, 1e3, 0.0), (1.0, 1.0, 1.0), (CENTRED,) * 3),  # layer 1: shifted on the host
        ((0.0, 0.0, 0.0), (1.0, 1e25, 1e-25), (CENTRED, SHIFTED, SHIFTED)),  # extreme scales: compiled, exact
    ],
    ids=["raw", "host-shifted", "compiled-shifted"],
)
def test_every_route_matches_the_float64_reference(offsets, scales, modes):
    batches_a = _batches(4, 10, offsets=offsets, scales=scales)
    batches_b = _batches(4, 30)
    assert host_side(_items(batches_a[0]), 0)[1] == modes
    eager, compiled = _eager_and_compiled(batches_a, batches_b)
    expected = ref.minibatch_cka(batches_a, batches_b)
    np.testing.assert_allclose(eager, expected, atol=2e-6)
    np.testing.assert_allclose(compiled, expected, atol=2e-6)


def test_the_raw_gram_is_refused_beyond_the_offset_ratio():
    """A layer whose raw gram would lose precision to its feature means is shifted first."""
    layer = _layers(2)[1]
    for offset, shifted in [(0.0, False), (30.0, True)]:
        x = (layer + offset).astype(np.float64)
        ratio = np.sum(x * x) / np.sum((x - x.mean(0)) ** 2)
        assert (ratio > MAX_OFFSET_RATIO) == shifted
        x32 = x.astype(np.float32)
        acc = MinibatchCKA.create(1).update([x32])
        np.testing.assert_allclose(acc.xx, MinibatchCKA.create(1).update([x32 - x32[0]]).xx, rtol=1e-5)


def test_population_and_within_model_routes_agree():
    pop_a = _batches(3, 50, models=3)
    pop_b = _batches(3, 60, models=2)
    eager, compiled = _eager_and_compiled(pop_a, pop_b, num_models_a=3, num_models_b=2)
    np.testing.assert_allclose(eager, compiled, atol=1e-6)
    for i in range(3):
        for j in range(2):
            pairs = ref.minibatch_cka([[x[i] for x in a] for a in pop_a], [[x[j] for x in b] for b in pop_b])
            np.testing.assert_allclose(eager[i, j], pairs, atol=2e-6)
    within = MinibatchCKA.create(3)
    for a in _batches(3, 70, offsets=(0.0, 50.0, 0.0)):
        within = within.update(a)
    np.testing.assert_allclose(
        within.result(), ref.minibatch_cka(*[_batches(3, 70, offsets=(0.0, 50.0, 0.0))] * 2), atol=2e-6
    )


def test_one_bad_model_sends_its_layer_to_compiled_code():
    """A layer is CENTRED only if every model's raw or shifted gram is usable; NaN in one model
    makes that layer's entries NaN for that model and leaves the others exact."""
    pop = _layers(80, models=3)
    pop[2] = pop[2].copy()
    pop[2][1, 3, 0] = np.nan
    side, modes = host_side(_items(pop), 1)
    assert modes == (CENTRED, CENTRED, SHIFTED)
    assert side.acts[2] is not None and side.acts[0] is None
    acc = MinibatchCKA.create(3, num_models_a=3).update(pop)
    heatmap = np.asarray(acc.result())
    assert np.isnan(heatmap[1, :, 2, :]).all() and np.isnan(heatmap[:, 1, :, 2]).all()
    assert np.isfinite(heatmap[0, 2]).all() and np.isfinite(heatmap[0, 0, 2, 2])


def test_the_compiled_route_for_tracers_and_other_dtypes():
    layers = _layers(90)
    assert host_side(_items([x.astype(np.float16) for x in layers]), 0)[1] == (AUTO,) * 3
    modes = []
    jax.jit(lambda xs: modes.append(host_side(_items(xs), 0)[1]))(layers)
    assert modes == [(AUTO,) * 3]
    mixed = [layers[0], layers[1].astype(np.int32), jnp.asarray(layers[2])]
    assert host_side(_items(mixed), 0)[1] == (CENTRED, AUTO, CENTRED)


def test_the_blas_thread_limit_is_restored():
    before = [info["num_threads"] for info in threadpool_info()]
    MinibatchCKA.create(3).update(_layers(100))
    assert [info["num_threads"] for info in threadpool_info()] == before


def test_the_callers_arrays_are_read_before_update_returns():
    layers = _layers(110)
    expected = np.asarray(MinibatchCKA.create(3).update([x.copy() for x in layers]).result())
    acc = MinibatchCKA.create(3).update(layers)
    for x in layers:
        x[...] = np.random.default_rng(0).normal(size=x.shape)
    np.testing.assert_array_equal(np.asarray(acc.result()), expected)


def test_compare_runs_the_program_update_compiled(jax_events):
    """`compare` calls `update` itself: after `update` compiled these shapes, `compare` compiles
    no update program of its own (only its result and reporting steps)."""
    from cka_jax import compare

    rng = np.random.default_rng(120)
    batches = [({"a": rng.normal(size=(N, 6)).astype(np.float32)}, {"b": rng.normal(size=(N, 9)).astype(np.float32)})]
    MinibatchCKA.create(1, 1).update([batches[0][0]["a"]], [batches[0][1]["b"]])
    with jax_events("/jax/core/compile/backend_compile_duration") as compiled:
        compare(None, batches=batches * 2, progress=False)
    assert not [name for name in compiled if "update" in name or "lambda" in name], compiled


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # the child runs host code only, no JAX
def test_a_forked_child_builds_grams_with_workers_of_its_own():
    import multiprocessing

    layers = _layers(130)
    expected = np.asarray(MinibatchCKA.create(3).update(layers).result())  # the parent's workers exist now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(_heatmap_in_child, (layers,)).get(timeout=120)
    np.testing.assert_allclose(child, expected, rtol=1e-6)


def _heatmap_in_child(layers):
    from cka_jax._host_grams import host_side

    side, modes = host_side(_items(layers), 0)  # host code only: no compiled program in the child
    assert modes == (CENTRED,) * 3
    return _heatmap_of_triangles(np.asarray(side.centred))


def _heatmap_of_triangles(packed):
    """CKA of every layer pair from host-built upper triangles (M=1, L, D)."""
    flat = packed[0].astype(np.float64)
    products = flat @ flat.T
    return products / np.sqrt(np.outer(np.diag(products), np.diag(products)))


def test_concurrent_updates_agree_and_restore_the_blas_threads():
    """Callers on several threads: each result as if alone, and BLAS's process-wide thread count
    restored after all of them."""
    from concurrent.futures import ThreadPoolExecutor

    before = [info["num_threads"] for info in threadpool_info()]
    batches = [_layers(140 + i, widths=(64, 300, 50)) for i in range(6)]
    alone = [np.asarray(MinibatchCKA.create(3).update(b).result()) for b in batches]
    with ThreadPoolExecutor(3) as callers:
        together = list(callers.map(lambda b: np.asarray(MinibatchCKA.create(3).update(b).result()), batches * 3))
    for i, heatmap in enumerate(together):
        np.testing.assert_array_equal(heatmap, alone[i % len(batches)])
    assert [info["num_threads"] for info in threadpool_info()] == before
