"""A result does not depend on how its inputs are fed: caller buffers reused or edited after the
call, 64-bit integers, float64 without 64-bit mode, grams that are not grams, functions JAX
cannot trace.

Aliasing is provoked, not hoped for: every host array is 64-byte aligned (so JAX on CPU would
compute from the caller's memory without a copy), and a long computation is queued on the
device just before the call, so the call's own computation runs only after the caller has
overwritten its arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import minibatch_cka as reference_minibatch_cka

import cka_jax
from cka_jax import MinibatchCKA


def aligned(values: np.ndarray) -> np.ndarray:
    """A 64-byte aligned copy of values: JAX on CPU uses such a buffer without copying it."""
    values = np.asarray(values)
    buffer = np.empty(values.nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    out = buffer[start : start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


@jax.jit
def _busy(a: jax.Array) -> jax.Array:
    for _ in range(6):
        a = jnp.tanh(a @ a)
    return a


BUSY = jnp.asarray(np.random.default_rng(0).normal(size=(600, 600)).astype(np.float32) / 40)
_busy(BUSY).block_until_ready()


def keep_device_busy() -> None:
    """Queues about 20 ms of work on the device (far longer than a refill), without waiting for it."""
    _busy(BUSY)


def overwrite(*buffers: np.ndarray) -> None:
    for b in buffers:
        b[...] = 0


def _rng_pair(n=64, p=12, q=9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)).astype(np.float32)
    y = (np.tanh(x @ rng.normal(size=(p, q))) + 0.3 * rng.normal(size=(n, q))).astype(np.float32)
    return x, y


def _grams(x, y):
    return np.asarray(cka_jax.gram_linear(x)), np.asarray(cka_jax.gram_linear(y))


def _ugrams(x, y):
    return np.asarray(cka_jax.minibatch_grams([x, y]))


# Each entry: (name, inputs from (x, y), call on those inputs -> a pytree of results).
ENTRY_POINTS = [
    ("linear_cka", lambda x, y: (x, y), lambda x, y: cka_jax.linear_cka(x, y)),
    ("linear_cka debiased", lambda x, y: (x, y), lambda x, y: cka_jax.linear_cka(x, y, debiased=True)),
    ("rbf_cka", lambda x, y: (x, y), lambda x, y: cka_jax.rbf_cka(x, y, 0.5)),
    ("cka of grams", _grams, lambda gx, gy: cka_jax.cka(gx, gy, debiased=True)),
    ("hsic", _grams, lambda gx, gy: cka_jax.hsic(gx, gy, unbiased=True)),
    ("center_gram", lambda x, y: _grams(x, y)[:1], lambda g: cka_jax.center_gram(g)),
    ("gram_linear", lambda x, y: (x,), lambda x: cka_jax.gram_linear(x)),
    ("gram_rbf", lambda x, y: (x,), lambda x: cka_jax.gram_rbf(x)),
    ("cca", lambda x, y: (x, y), lambda x, y: cka_jax.cca(x, y).rho),
    ("mean_cca", lambda x, y: (x, y), lambda x, y: cka_jax.mean_cca(x, y)),
    ("svcca", lambda x, y: (x, y), lambda x, y: cka_jax.svcca(x, y, keep=5)),
    ("pwcca", lambda x, y: (x, y), lambda x, y: cka_jax.pwcca(x, y)),
    ("unit_correlations", lambda x, y: (x, y), lambda x, y: cka_jax.unit_correlations(x, y)),
    ("match_units", lambda x, y: (x, y), lambda x, y: cka_jax.match_units(x, y).correlations),
    ("first_pc_variance_fraction", lambda x, y: (x,), lambda x: cka_jax.first_pc_variance_fraction(x)),
    ("first_pc_scores", lambda x, y: (x,), lambda x: cka_jax.first_pc_scores(x)),
    ("first_pc_direction", lambda x, y: (x,), lambda x: cka_jax.first_pc_direction(x)),
    ("remove_first_pc", lambda x, y: (x,), lambda x: cka_jax.remove_first_pc(x)),
    ("first_pc_cosine_similarity", lambda x, y: (x, y), lambda x, y: cka_jax.first_pc_cosine_similarity([x, y])),
    ("minibatch_grams", lambda x, y: (x, y), lambda x, y: cka_jax.minibatch_grams([x, y])),
    ("MinibatchCKA.update", lambda x, y: (x, y), lambda x, y: MinibatchCKA.create(1, 1).update([x], [y]).result()),
    (
        "MinibatchCKA.update within",
        lambda x, y: (x, y),
        lambda x, y: MinibatchCKA.create(2).update([x, y]).result(),
    ),
    (
        "MinibatchCKA.update population",
        lambda x, y: (np.stack([x, 2 * x + 1]), np.stack([y, -y])),
        lambda x, y: MinibatchCKA.create(1, 1, num_models_a=2).update([x], [y]).result(),
    ),
    (
        "MinibatchCKA.update_grams",
        lambda x, y: (_ugrams(x, y),),
        lambda g: MinibatchCKA.create(2).update_grams(g).result(),
    ),
    (
        "compare stream",
        lambda x, y: (x, y),
        lambda x, y: cka_jax.compare(None, batches=[({"x": x}, {"y": y})], progress=False, devices=1).heatmap,
    ),
    (
        "compare stream, whole set",
        lambda x, y: (x, y),
        lambda x, y: (
            cka_jax.compare(None, batches=[({"x": x}, {"y": y})], debiased=False, progress=False, devices=1).heatmap
        ),
    ),
    (
        "compare function",
        lambda x, y: (x,),
        lambda x: cka_jax.compare(lambda v: {"v": v, "t": jnp.tanh(v)}, batches=[x], progress=False).heatmap,
    ),
]


@pytest.mark.parametrize("name, inputs, call", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
def test_result_does_not_change_when_the_caller_overwrites_its_arrays(name, inputs, call):
    x, y = _rng_pair()
    fresh = [np.array(a) for a in inputs(x, y)]
    expected = jax.tree.map(np.asarray, call(*fresh))
    buffers = [aligned(a) for a in fresh]
    keep_device_busy()
    result = call(*buffers)
    overwrite(*buffers)
    jax.tree.map(lambda r, e: np.testing.assert_array_equal(np.asarray(r), e), result, expected)


def test_update_sharded_owns_its_arrays():
    mesh = jax.make_mesh((2,), ("batch",))
    x, y = _rng_pair(seed=1)
    xs, ys = np.stack([x, x[::-1] * 2]), np.stack([y, y + 1])
    expected = np.asarray(MinibatchCKA.create(1, 1).update_sharded([xs], [ys], mesh=mesh).result())
    bx, by = aligned(xs), aligned(ys)
    keep_device_busy()
    acc = MinibatchCKA.create(1, 1).update_sharded([bx], [by], mesh=mesh)
    overwrite(bx, by)
    np.testing.assert_array_equal(np.asarray(acc.result()), expected)


def _refilled(batches):
    """Yields every batch through one preallocated set of aligned buffers, refilled each time,
    as many data loaders do."""
    buffers = None
    for batch in batches:
        if buffers is None:
            buffers = [aligned(a) for a in batch]
        else:
            for b, a in zip(buffers, batch, strict=True):
                b[...] = a
        yield buffers


def _stream(seed=2, batches=6, n=32):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        x = rng.normal(size=(n, 10)).astype(np.float32)
        out.append(
            [x, np.tanh(x @ rng.normal(size=(10, 6))).astype(np.float32), rng.normal(size=(n, 5)).astype(np.float32)]
        )
    return out


def test_update_loop_over_one_refilled_buffer_per_layer():
    batches = _stream()
    expected = reference_minibatch_cka([b[:2] for b in batches], [b[1:] for b in batches])
    acc = MinibatchCKA.create(2, 2)
    for buffers in _refilled(batches):
        keep_device_busy()
        acc = acc.update(buffers[:2], buffers[1:])
    np.testing.assert_allclose(np.asarray(acc.result()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("debiased", [True, False])
def test_compare_over_a_refilled_stream(debiased):
    batches = _stream(seed=3)

    def as_pairs(stream):
        for buffers in stream:
            keep_device_busy()
            yield {"a": buffers[0], "b": buffers[1]}, {"c": buffers[2], "b": buffers[1]}

    fresh = cka_jax.compare(
        None,
        batches=as_pairs([[np.array(a) for a in b] for b in batches]),
        debiased=debiased,
        progress=False,
        devices=1,
    )
    refilled = cka_jax.compare(None, batches=as_pairs(_refilled(batches)), debiased=debiased, progress=False, devices=1)
    np.testing.assert_array_equal(refilled.heatmap, fresh.heatmap)


def test_compare_model_over_a_loader_that_refills_its_input():
    from flax import linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.tanh(nn.Dense(8, name="hidden")(x))
            return nn.Dense(3, name="out")(h)

    rng = np.random.default_rng(4)
    inputs = [rng.normal(size=(32, 6)).astype(np.float32) for _ in range(5)]
    variables = Net().init(jax.random.key(0), inputs[0])

    def loader(stream):
        for (x,) in stream:
            keep_device_busy()
            yield x, None

    fresh = cka_jax.compare((Net(), variables), batches=loader([(x,) for x in inputs]), progress=False)
    refilled = cka_jax.compare((Net(), variables), batches=loader(_refilled([(x,) for x in inputs])), progress=False)
    np.testing.assert_array_equal(refilled.heatmap, fresh.heatmap)


# ---- values are never changed on the way in ----


def _big_ints(seed=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, 6))
    return x, np.round(x * 1e10).astype(np.int64)


INT_MEASURES = [
    ("linear_cka", lambda a, b: cka_jax.linear_cka(a, b)),
    ("rbf_cka", lambda a, b: cka_jax.rbf_cka(a, b)),
    ("svcca", lambda a, b: cka_jax.svcca(a, b, keep=4)),
    ("pwcca", lambda a, b: cka_jax.pwcca(a, b)),
    ("mean_cca", lambda a, b: cka_jax.mean_cca(a, b)),
    ("first_pc_cosine_similarity", lambda a, b: cka_jax.first_pc_cosine_similarity([a, b])[0, 1]),
    ("MinibatchCKA.update", lambda a, b: MinibatchCKA.create(1, 1).update([a], [b]).result()[0, 0]),
    (
        "compare stream",
        lambda a, b: cka_jax.compare(None, batches=[({"a": a}, {"b": b})], progress=False).heatmap[0, 0],
    ),
]


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
@pytest.mark.parametrize("name, measure", INT_MEASURES, ids=[m[0] for m in INT_MEASURES])
def test_64_bit_integers_are_not_wrapped(name, measure, dtype):
    x, ints = _big_ints()
    if dtype == np.uint64:
        ints = (ints - ints.min()).astype(np.uint64) + np.uint64(2**40)
    assert float(measure(ints, x)) == pytest.approx(1.0, abs=2e-5)


def test_64_bit_integer_pca_is_not_wrapped():
    x, ints = _big_ints()
    np.testing.assert_allclose(
        np.asarray(cka_jax.first_pc_direction(ints)), np.asarray(cka_jax.first_pc_direction(x)), atol=1e-4
    )


@pytest.mark.parametrize(
    "transform",
    [lambda x: x * 1e-300, lambda x: x * 1e300, lambda x: 1e8 + 1e-4 * x, lambda x: -1e6 + x * 1e-3],
    ids=["1e-300", "1e300", "offset 1e8, spread 1e-4", "offset -1e6, spread 1e-3"],
)
def test_float64_without_x64_keeps_its_range(transform):
    x, _ = _big_ints()
    y = np.tanh(x @ np.random.default_rng(6).normal(size=(6, 4)))
    expected = float(cka_jax.linear_cka(x, y))
    assert float(cka_jax.linear_cka(transform(x), y)) == pytest.approx(expected, abs=1e-5)
    assert float(cka_jax.rbf_cka(transform(x), y)) == pytest.approx(float(cka_jax.rbf_cka(x, y)), abs=1e-5)
    assert float(cka_jax.svcca(transform(x), y, keep=4)) == pytest.approx(float(cka_jax.svcca(x, y, keep=4)), abs=1e-4)


@pytest.mark.parametrize("offset", [1e8, -1e6])
def test_float64_offsets_in_minibatches_are_kept(offset):
    batches = _stream(seed=7)
    shifted = [[offset + 1e-3 * b[0].astype(np.float64), b[1], b[2]] for b in batches]
    expected = reference_minibatch_cka([b[:2] for b in batches], [b[1:] for b in batches])
    acc = MinibatchCKA.create(2, 2)
    for b in shifted:
        acc = acc.update(b[:2], b[1:])
    np.testing.assert_allclose(np.asarray(acc.result()), expected, rtol=1e-4, atol=1e-5)
    streamed = cka_jax.compare(
        None, batches=[({"a": b[0], "b": b[1]}, {"b": b[1], "c": b[2]}) for b in shifted], progress=False
    )
    np.testing.assert_allclose(streamed.heatmap, expected, rtol=1e-4, atol=1e-5)


def test_float64_minibatches_beyond_float32_are_refused_not_lost():
    x = np.random.default_rng(8).normal(size=(16, 4)) * 1e-300
    with pytest.raises(ValueError, match=r"acts_a\[0\] holds float64 values .* outside float32's range.*x64"):
        MinibatchCKA.create(1).update([x])


def test_float64_grams_beyond_float32_are_refused_where_units_matter():
    gram = np.asarray(cka_jax.gram_linear(np.random.default_rng(9).normal(size=(10, 3)))).astype(np.float64)
    with pytest.raises(ValueError, match="gram_x holds float64 values .* outside float32's range"):
        cka_jax.hsic(gram * 1e300, gram)
    assert float(cka_jax.cka(gram * 1e300, gram * 1e-300)) == pytest.approx(1.0, abs=1e-6)  # scale-free: rescaled


def test_x64_mode_keeps_64_bit_integers_in_float64(x64):
    x, ints = _big_ints()
    offset = ints + np.int64(2**60)
    assert float(cka_jax.linear_cka(offset, x)) == pytest.approx(1.0, abs=1e-9)


# ---- grams that are not what the function takes ----


def test_update_grams_refuses_raw_and_asymmetric_grams():
    x, y = _rng_pair(n=32)
    raw = np.stack(_grams(x + 5, y))  # centred features' grams are not U-centred: their diagonal is not zero
    with pytest.raises(ValueError, match="grams_a is not U-centred"):
        MinibatchCKA.create(2).update_grams(raw)
    good = _ugrams(x, y)
    skew = good.copy()
    skew[0, 0, 1] += np.abs(good[0]).max()
    with pytest.raises(ValueError, match="grams_a is not symmetric"):
        MinibatchCKA.create(2).update_grams(skew)
    with pytest.raises(ValueError, match="grams_a is not U-centred"):
        MinibatchCKA.create(2).update_grams(jnp.asarray(raw))  # device arrays are checked too
    MinibatchCKA.create(2).update_grams(good)  # U-centred grams pass, NumPy or JAX
    MinibatchCKA.create(2).update_grams(jnp.asarray(good))


def test_cka_refuses_asymmetric_grams():
    x, y = _rng_pair(n=32)
    gx, gy = _grams(x, y)
    skew = gx.copy()
    skew[0, 3] += 0.5 * np.abs(gx).max()
    with pytest.raises(ValueError, match="gram_x is not symmetric"):
        cka_jax.cka(skew, gy)
    assert np.isfinite(float(cka_jax.cka(gx, gy)))


# ---- functions JAX cannot trace ----


def test_compare_runs_a_numpy_function_eagerly():
    rng = np.random.default_rng(10)
    w = rng.normal(size=(6, 5))
    batches = [rng.normal(size=(24, 6)).astype(np.float32) for _ in range(3)]

    def numpy_features(x):
        return {"h": np.tanh(x @ w), "x": x}

    result = cka_jax.compare(numpy_features, batches=batches, progress=False)
    acts = [[np.tanh(b @ w), b] for b in batches]
    np.testing.assert_allclose(result.heatmap, reference_minibatch_cka(acts, acts), rtol=1e-5, atol=1e-6)
    paired = cka_jax.compare(numpy_features, lambda x: {"x": jnp.asarray(x)}, batches=batches, progress=False)
    assert paired.layers_a == ("h", "x") and paired.layers_b == ("x",)
    np.testing.assert_allclose(paired.heatmap[1, 0], 1.0, rtol=1e-6)


def test_compare_reports_a_function_that_fails_on_data_too():
    def broken(x):
        raise RuntimeError("this model is broken")

    with pytest.raises(RuntimeError, match="this model is broken"):
        cka_jax.compare(broken, batches=[np.zeros((8, 3), np.float32)], progress=False)


# ---- a population stream needs a feature axis ----


def test_population_stream_without_a_feature_axis_is_refused():
    acts = {"h": np.random.default_rng(11).normal(size=(16, 10)).astype(np.float32)}
    with pytest.raises(ValueError, match=r"acts_a\['h'\] has shape \(16, 10\): in population mode .*\(models, batch"):
        cka_jax.compare(None, batches=[acts], population=True, progress=False)
    with pytest.raises(ValueError, match=r"model_a\['h'\] has shape \(16, 10\): in population mode"):
        cka_jax.compare(
            lambda x: {"h": x[:, :, 0]}, batches=[np.zeros((16, 10, 3), np.float32)], population=True, progress=False
        )


# ---- NNX layer names follow network order ----


def test_nnx_value_passed_through_dropout_keeps_the_name_of_its_producer():
    from flax import nnx

    class Chain(nnx.Module):  # the dropout's own name sorts before its producer's
        def __init__(self, rngs):
            self.zz = nnx.Linear(6, 8, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.aa = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.aa(self.drop(self.zz(x)))

    batches = [np.random.default_rng(12).normal(size=(16, 6)).astype(np.float32)]
    result = cka_jax.compare(Chain(nnx.Rngs(0)), batches=batches, layers_a="zz", progress=False)
    assert result.layers_a == ("zz",)
    every = cka_jax.compare(Chain(nnx.Rngs(0)), batches=batches, progress=False)
    assert every.layers_a == ("zz", "aa")


def test_training_batches_on_devices_own_their_data():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cka_jax.train.population import host_to_sharded

    images = aligned(np.arange(8 * 4 * 4, dtype=np.float32).reshape(8, 4, 4))
    expected = images.copy()
    mesh = jax.make_mesh((8,), ("pop",))
    for spec in (P(), P("pop")):
        on_devices = host_to_sharded(images, NamedSharding(mesh, spec))
        overwrite(images)  # the loader refills its buffer for the next batch
        np.testing.assert_array_equal(np.asarray(on_devices), expected)
        images[...] = expected


@pytest.mark.parametrize("pair", [False, True], ids=["itself", "pair"])
def test_compare_runs_a_numpy_function_eagerly_over_several_devices(pair):
    rng = np.random.default_rng(13)
    w = rng.normal(size=(6, 5))
    batches = [rng.normal(size=(16, 6)).astype(np.float32) for _ in range(4)]

    def numpy_features(x):
        return {"h": np.tanh(x @ w), "x": x}

    model_b = (lambda x: {"x": np.asarray(x) * 2.0}) if pair else None
    sharded = cka_jax.compare(numpy_features, model_b, batches=batches, devices=2, progress=False)
    serial = cka_jax.compare(numpy_features, model_b, batches=batches, devices=1, progress=False)
    np.testing.assert_allclose(sharded.heatmap, serial.heatmap, rtol=1e-6)
