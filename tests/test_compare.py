"""cka_jax.compare: the one-call heatmap against MinibatchCKA by hand and a float64 reference;
linen, NNX, callable and activation-stream models; populations, sharding, bad input, save/load
and the plot."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from fresh_interpreter import run_fresh

import cka_jax
import cka_jax.models
from cka_jax import CKAComparison, MinibatchCKA, compare, load_comparison


class TinyCNN(nn.Module):
    """Conv -> block(conv, sown pre-activation) -> pooled dense: 5 named layers in call order."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = TinyBlock(name="block")(x)
        return nn.Dense(3)(x.mean((1, 2)))


class TinyBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Conv(5, (3, 3), name="conv")(x)
        self.sow("intermediates", "pre_relu", y)
        return nn.relu(y) + 0.1


class TinyNNX(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.conv(x)))
        self.sow(nnx.Intermediate, "pooled", h.mean((1, 2)))
        return self.dense(h.mean((1, 2)))


def _inputs(sizes=(16, 16, 16, 9), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 6, 6, 1)).astype(np.float32) for n in sizes]


def _linen(seed):
    model = TinyCNN()
    return model, model.init(jax.random.key(seed), jnp.zeros((2, 6, 6, 1)))


def _linen_acts(model, variables, x):
    """TinyCNN's layers captured by hand, in call order."""
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    i = state["intermediates"]
    return [
        i["Conv_0"]["__call__"][0],
        i["block"]["conv"]["__call__"][0],
        i["block"]["__call__"][0],
        i["Dense_0"]["__call__"][0],
    ]


def _by_hand(acts_a, acts_b=None, **create):
    acc = MinibatchCKA.create(len(acts_a[0]), None if acts_b is None else len(acts_b[0]), **create)
    for i, a in enumerate(acts_a):
        acc = acc.update(a, None if acts_b is None else acts_b[i])
    return acc


def reference_minibatch_cka(batches_a, batches_b):
    """Float64 minibatch CKA from the formula: Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K, K) Σ_b HSIC₁(L, L)),
    HSIC₁ of Song et al. 2012: [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))."""

    def hsic1(k, l):
        n = k.shape[0]
        k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        one = np.ones(n)
        return (
            np.trace(k @ l)
            + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)
        ) / (n * (n - 3))

    la, lb = len(batches_a[0]), len(batches_b[0])
    xy, xx, yy = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for acts_a, acts_b in zip(batches_a, batches_b, strict=True):
        ka = [(a := np.asarray(x, np.float64).reshape(len(x), -1)) @ a.T for x in acts_a]
        kb = [(b := np.asarray(y, np.float64).reshape(len(y), -1)) @ b.T for y in acts_b]
        xy += np.array([[hsic1(k, l) for l in kb] for k in ka])
        xx += [hsic1(k, k) for k in ka]
        yy += [hsic1(l, l) for l in kb]
    return xy / np.sqrt(xx[:, None] * yy[None, :])


@pytest.mark.slow
def test_linen_pair_equals_minibatch_cka_by_hand():
    (model, va), (_, vb) = _linen(0), _linen(1)
    data = _inputs()  # the last batch is short: it counts as one minibatch, as in MinibatchCKA
    result = compare((model, va), (model, vb), [(x, np.zeros(len(x))) for x in data], num_bootstrap=16, progress=False)
    assert result.layers_a == ("Conv_0", "block/conv", "block", "Dense_0")  # block/pre_relu is block/conv's output
    acc = _by_hand(
        [_linen_acts(model, va, x) for x in data], [_linen_acts(model, vb, x) for x in data], num_bootstrap=16
    )
    np.testing.assert_allclose(result.heatmap, acc.result(), rtol=1e-6, atol=1e-7)
    for mine, theirs in zip(result.interval, acc.bootstrap_interval(0.95), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    assert (result.num_examples, result.num_minibatches) == (57, 4)
    assert (result.name_a, result.name_b, result.level) == ("TinyCNN", "TinyCNN", 0.95)


def test_layer_selection_by_name_and_glob_keeps_network_order():
    model, variables = _linen(0)
    data = _inputs((8, 8))
    result = compare((model, variables), batches=data, layers_a=["Dense_0", "block*"], progress=False)
    assert result.layers_a == result.layers_b == ("block/conv", "block", "Dense_0")
    np.testing.assert_allclose(np.diag(result.heatmap), 1.0, rtol=1e-6)
    acts = [[a for a, keep in zip(_linen_acts(model, variables, x), (0, 1, 1, 1), strict=True) if keep] for x in data]
    np.testing.assert_allclose(result.heatmap, _by_hand(acts).result(), rtol=1e-6)


def test_nnx_module_equals_hand_captured_activations():
    model = TinyNNX(nnx.Rngs(0))
    data = _inputs((12, 12, 12))
    result = compare(model, batches=data, progress=False)
    assert result.layers_a == ("conv", "drop", "pooled", "dense")  # the model's output is dense's: listed once

    def by_hand(x):
        h = nnx.relu(model.conv(x))  # evaluation mode: dropout passes h through
        return [model.conv(x), h, h.mean((1, 2)), model.dense(h.mean((1, 2)))]

    np.testing.assert_allclose(result.heatmap, _by_hand([by_hand(x) for x in data]).result(), rtol=1e-6)
    assert not model.drop.deterministic  # the user's module is left as it was


@pytest.mark.slow
def test_callable_and_resnet_models_cross_comparison():
    model, variables = _linen(0)
    resnet = cka_jax.models.CifarResNet(depth=8, width=0.25, num_classes=3)
    rvars = resnet.init(jax.random.key(2), jnp.zeros((2, 6, 6, 1)))
    data = _inputs((10, 10))
    fn = lambda x: {"logits": model.apply(variables, x), "input": x}  # noqa: E731 - a user's one-liner
    result = compare(fn, (resnet, rvars), data, layers_b="*/post_residual", names=("fn", "resnet"), progress=False)
    assert result.layers_a == ("logits", "input")  # the mapping's own order
    assert result.layers_b == (
        "stage1/block1/post_residual",
        "stage2/block1/post_residual",
        "stage3/block1/post_residual",
    )
    blocks = jax.jit(lambda x: list(resnet.apply(rvars, x, capture="blocks")[1].values())[1:])
    logits = jax.jit(lambda x: model.apply(variables, x))
    acc = _by_hand([[logits(x), x] for x in data], [blocks(x) for x in data])
    np.testing.assert_allclose(result.heatmap, acc.result(), rtol=1e-5, atol=1e-6)


def test_compiled_forward_is_reused_only_for_the_same_function_of_params():
    (model, va), (_, vb) = _linen(0), _linen(1)
    data = _inputs((8, 8))
    forward = compare((model, va), (model, vb), data, progress=False)
    backward = compare((model, vb), (model, va), data, progress=False)  # the cached forwards, other variables
    np.testing.assert_allclose(backward.heatmap, forward.heatmap.T, rtol=1e-6)
    state = {"variables": va}  # a callable closing over values that change: never reused
    fn = lambda x: {"logits": model.apply(state["variables"], x), "x": x}  # noqa: E731
    first = compare(fn, batches=data, progress=False)
    state["variables"] = vb
    second = compare(fn, batches=data, progress=False)
    expected = compare(lambda x: {"logits": model.apply(vb, x), "x": x}, batches=data, progress=False)
    np.testing.assert_allclose(second.heatmap, expected.heatmap, rtol=1e-6)
    assert not np.allclose(first.heatmap, second.heatmap)


def test_numpy_activation_stream_matches_float64_reference():
    rng = np.random.default_rng(3)
    batches = []
    for n in (20, 20, 11):
        x = rng.normal(size=(n, 7))
        acts_a = {
            "x": x,
            "rotated": 3 * x @ np.linalg.qr(rng.normal(size=(7, 7)))[0],
            "tanh": np.tanh(x @ rng.normal(size=(7, 5))),
        }
        acts_b = {"noisy": x[:, :4] + 0.5 * rng.normal(size=(n, 4)), "square": (x**2).reshape(n, 7, 1)}
        batches.append(({k: v.astype(np.float32) for k, v in acts_a.items()}, acts_b))
    result = compare(None, batches=batches, progress=False)
    expected = reference_minibatch_cka([list(a.values()) for a, _ in batches], [list(b.values()) for _, b in batches])
    np.testing.assert_allclose(result.heatmap, expected, rtol=1e-5, atol=1e-6)
    assert result.value("x", "noisy") == pytest.approx(expected[0, 0], rel=1e-5)
    within = compare(None, batches=[a for a, _ in batches], layers_a="*t*", progress=False)
    assert within.layers_a == ("rotated", "tanh")
    assert within.value("rotated", "rotated") == pytest.approx(1.0, rel=1e-6)


def test_whole_set_biased_cka_equals_library_cka():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(6, 4))).astype(np.float32)
    stream = [({"x": x[:15]}, {"y": y[:15]}), ({"x": x[15:]}, {"y": y[15:]})]
    result = compare(None, batches=stream, debiased=False, progress=False)
    assert float(result.heatmap[0, 0]) == pytest.approx(float(cka_jax.linear_cka(x, y)), rel=1e-5)
    rbf = compare(None, batches=stream, debiased=False, kernel="rbf", threshold=0.7, progress=False)
    assert float(rbf.heatmap[0, 0]) == pytest.approx(float(cka_jax.rbf_cka(x, y, 0.7)), rel=1e-5)


def _population(seeds):
    model = TinyCNN()
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    return model, jax.vmap(model.init, (0, None))(keys, jnp.zeros((2, 6, 6, 1)))


@pytest.mark.slow
def test_population_equals_per_model_loop():
    (model, pop_a), (_, pop_b) = _population((0, 1, 2)), _population((3, 4, 5))
    data = _inputs((12, 12, 12))
    per_model = compare((model, pop_a), (model, pop_b), data, population=True, kernel="rbf", progress=False)
    assert per_model.heatmap.shape == (3, 4, 4)
    every = compare((model, pop_a), (model, pop_b), data, population=True, all_pairs=True, kernel="rbf", progress=False)
    assert every.heatmap.shape == (3, 3, 4, 4)
    for i in range(3):
        one = lambda tree: jax.tree.map(lambda a: a[i], tree)  # noqa: E731, B023 - used at once
        single = compare((model, one(pop_a)), (model, one(pop_b)), data, kernel="rbf", progress=False)
        np.testing.assert_allclose(per_model.heatmap[i], single.heatmap, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(every.heatmap[i, i], single.heatmap, rtol=1e-5, atol=1e-6)
    itself = compare((model, pop_a), batches=data, population=True, progress=False)
    np.testing.assert_allclose(np.diagonal(itself.heatmap, axis1=1, axis2=2), 1.0, rtol=1e-5)


def test_nnx_population_equals_each_model():
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return TinyNNX(nnx.Rngs(key))

    population = create(jax.random.split(jax.random.key(0), 3))
    data = _inputs((8, 8))
    result = compare(population, batches=data, population=True, progress=False)
    assert result.heatmap.shape == (3, 4, 4)
    graphdef, state = nnx.split(population)
    second = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], state))
    np.testing.assert_allclose(result.heatmap[1], compare(second, batches=data, progress=False).heatmap, rtol=1e-5)


@pytest.mark.slow  # imports torch
def test_torch_loader_and_forward_hook_activations():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    model, variables = _linen(0)
    data = _inputs((8, 8, 8))
    x = np.concatenate(data)
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.zeros(len(x))), batch_size=8)  # (x, y) batches
    from_torch = compare((model, variables), batches=loader, progress=False)
    np.testing.assert_allclose(
        from_torch.heatmap, compare((model, variables), None, data, progress=False).heatmap, rtol=1e-6
    )
    net = torch.nn.Sequential(torch.nn.Linear(36, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    recorded = {}
    for name, layer in net.named_children():
        layer.register_forward_hook(lambda module, inputs, out, name=name: recorded.__setitem__(name, out))
    stream = []
    for batch in data:
        net(torch.from_numpy(batch.reshape(len(batch), -1)))
        stream.append(dict(recorded))  # tensors that require grad: compare detaches them
    result = compare(None, batches=stream, progress=False)
    host = [[a.detach().numpy() for a in acts.values()] for acts in stream]
    np.testing.assert_allclose(result.heatmap, reference_minibatch_cka(host, host), rtol=1e-5, atol=1e-6)
    assert result.layers_a == ("0", "1", "2")


@pytest.mark.slow
def test_sharded_equals_serial():
    assert jax.local_device_count() == 8  # tests/conftest.py: 8 fake CPU devices
    (model, va), (_, vb) = _linen(0), _linen(1)
    data = _inputs((8,) * 17 + (5,))  # two groups of 8 sharded, then one full and one short batch serially
    options = dict(num_bootstrap=8, progress=False)
    sharded = compare((model, va), (model, vb), data, devices=None, **options)
    serial = compare((model, va), (model, vb), data, devices=1, **options)
    np.testing.assert_allclose(sharded.heatmap, serial.heatmap, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(sharded.interval, serial.interval, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert sharded.num_minibatches == 18 and sharded.num_examples == 141


def test_sharded_population_stream_equals_serial():
    rng = np.random.default_rng(5)
    stream = [{"a": rng.normal(size=(2, 6, 3)), "b": rng.normal(size=(2, 6, 2, 2))} for _ in range(8)]
    sharded = compare(None, batches=stream, population=True, devices=4, progress=False)
    serial = compare(None, batches=stream, population=True, devices=1, progress=False)
    np.testing.assert_allclose(sharded.heatmap, serial.heatmap, rtol=1e-5, atol=1e-6)
    assert sharded.heatmap.shape == (2, 2, 2)


def test_drop_remainder_and_max_batches():
    rng = np.random.default_rng(6)
    stream = [{"a": rng.normal(size=(n, 3)), "b": rng.normal(size=(n, 4))} for n in (10, 10, 3)]
    with pytest.raises(ValueError, match="batch 2 has 3 examples.*drop_remainder=True"):
        compare(None, batches=stream, progress=False)
    dropped = compare(None, batches=stream, drop_remainder=True, progress=False)
    first_two = compare(None, batches=stream, max_batches=2, progress=False)
    np.testing.assert_allclose(dropped.heatmap, first_two.heatmap)
    assert dropped.num_examples == first_two.num_examples == 20


def test_nan_activations_give_nan_and_a_warning_naming_the_layer_and_batch():
    rng = np.random.default_rng(7)
    stream = [
        {"ok": rng.normal(size=(8, 3)), "bad": rng.normal(size=(8, 3)), "flat": np.ones((8, 2))} for _ in range(4)
    ]
    stream[2]["bad"][1, 0] = np.nan
    with pytest.warns(RuntimeWarning) as caught:
        result = compare(None, batches=stream, devices=1, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("'bad' has NaN or inf activations (first in batch 2)" in m for m in messages)
    assert any("'flat' is constant on every minibatch" in m for m in messages)
    assert np.isnan(result.heatmap[1]).all() and np.isnan(result.heatmap[:, 2]).all()
    assert result.heatmap[0, 0] == pytest.approx(1.0)


def _linen_varying(x):
    return {"h": x.reshape(len(x), -1)}


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m: compare(m, None, _inputs((8,)), layers_a="nope*", progress=False),
            r"model_a: 'nope\*' matches no layer; its layers are Conv_0 \(8, 6, 6, 4\), block/conv",
        ),
        (lambda m: compare(m, None, [], progress=False), "batches is empty"),
        (lambda m: compare(m, None, iter(()), progress=False), "batches is empty"),
        (lambda m: compare("resnet", None, _inputs((8,)), progress=False), "model_a: unsupported model of type str"),
        (lambda m: compare(m[0], None, _inputs((8,)), progress=False), "a linen module needs its variables"),
        (lambda m: compare(m, None, np.zeros((4, 8, 6, 6, 1)), progress=False), "batches is one array"),
        (lambda m: compare(m, None, [{"image": np.zeros((8, 6, 6, 1))}], progress=False), "pass input_key="),
        (
            lambda m: compare(
                _linen_varying, None, _inputs((8,)) + [np.zeros((8, 5, 5, 1), np.float32)], progress=False
            ),
            r"model_a layer 'h' changes shape between batches: \(\*, 36\) in batch 0, \(8, 25\) in batch 1",
        ),
        (
            lambda m: compare(None, None, [({"a": np.ones((8, 2))}, {"b": np.ones((6, 2))})], progress=False),
            "batch 0: acts_a layer 'a' has 8 examples .* acts_b layer 'b' has 6",
        ),
        (lambda m: compare(None, m, [{"a": np.ones((8, 2))}], progress=False), "model_b must then be None"),
        (
            lambda m: compare(m, None, _inputs((8,)), layers_a="Conv_0", layers_b="Conv_0", progress=False),
            "layers_b needs model_b",
        ),
        (lambda m: compare(m, None, _inputs((8,)), kernel="cosine", progress=False), "unknown kernel"),
        (lambda m: compare(m, None, _inputs((8,)), all_pairs=True, progress=False), "needs population=True"),
        (
            lambda m: compare(m, None, _inputs((8,)), debiased=False, num_bootstrap=4, progress=False),
            "need the minibatch estimator",
        ),
        (lambda m: compare(m, None, _inputs((8,)), devices=99, progress=False), "devices=99"),
        (lambda m: compare(m, None, None), "batches is required"),
    ],
)
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(_linen(0))
    assert "\n" not in str(error.value)


def test_mismatched_populations_need_all_pairs():
    (model, pop_a), (_, pop_b) = _population((0, 1, 2)), _population((3, 4))
    with pytest.raises(ValueError, match="model_a has 3 models and model_b 2.*all_pairs=True"):
        compare((model, pop_a), (model, pop_b), _inputs((8,)), population=True, progress=False)


def test_save_load_round_trip_and_damaged_files(tmp_path):
    rng = np.random.default_rng(8)
    stream = [{"a": rng.normal(size=(9, 3)), "b": rng.normal(size=(9, 4))} for _ in range(3)]
    result = compare(None, batches=stream, num_bootstrap=5, level=0.9, names=("mine", "mine"), progress=False)
    path = tmp_path / "cka.npz"
    result.save(path)
    back = load_comparison(path)
    assert isinstance(back, CKAComparison) and repr(back) == repr(result)
    np.testing.assert_array_equal(back.heatmap, result.heatmap)
    np.testing.assert_array_equal(back.interval[1], result.interval[1])
    assert (back.layers_a, back.level, back.num_bootstrap, back.name_a) == (("a", "b"), 0.9, 5, "mine")
    assert repr(CKAComparison.load(path)) == repr(result)  # the same reader as a classmethod

    raw = bytearray(path.read_bytes())
    at = bytes(raw).index(result.heatmap.astype(np.float64).tobytes())
    raw[at + 3] ^= 0x01  # one bit of one heatmap value
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(raw))
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, heatmap=np.eye(2))
    text = tmp_path / "notes.npz"
    text.write_text("not a comparison")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])
    for bad in (damaged, foreign, text, truncated):
        with pytest.raises(ValueError) as error:
            load_comparison(bad)
        assert str(bad) in str(error.value) and "\n" not in str(error.value)


def test_plot_orientation_labels_and_population_panels():
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(9)
    stream = [
        (
            {"a": rng.normal(size=(8, 3)), "b": rng.normal(size=(8, 3)), "c": np.ones((8, 1))},
            {"x": rng.normal(size=(8, 2)), "y": rng.normal(size=(8, 2))},
        )
        for _ in range(2)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # layer c is constant: a NaN row
        result = compare(None, batches=stream, names=("net", "other"), progress=False)
    fig = result.plot()
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    image = ax.get_images()[0]
    assert image.origin == "lower" and image.get_cmap().name.startswith("magma")
    assert image.get_array().shape == (3, 2) and image.get_array().mask[2].all()  # NaN row left to the hatching
    assert ax.get_ylabel() == "net layer" and ax.get_xlabel() == "other layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"]
    assert ax.get_ylim()[0] < ax.get_ylim()[1]  # layer 0 at the bottom
    assert any(a.get_label() == "<colorbar>" for a in fig.axes)
    pop = CKAComparison(np.full((3, 2, 2), 0.5), ("p", "q"), ("p", "q"), 10, 2, population=True)
    assert len(pop.plot().axes) == 3 + 1  # three panels and the colorbar
    assert len(pop.plot(index=1).axes) == 2
    pairs = CKAComparison(np.full((7, 7, 2, 2), 0.5), ("p", "q"), ("p", "q"), 10, 2, population=True, all_pairs=True)
    assert len(pairs.plot(index=(2, 3)).axes) == 2
    with pytest.raises(ValueError, match="49 heatmaps are too many"):
        pairs.plot()
    matplotlib.pyplot.close("all")


@pytest.mark.slow  # a fresh interpreter
def test_import_stays_light():
    """cka_jax.compare loads nothing beyond what `import cka_jax` loads (flax, matplotlib, tqdm on use)."""
    code = (
        "import sys, cka_jax; before = set(sys.modules); import cka_jax._compare; "
        "print(sorted(m.split('.')[0] for m in set(sys.modules) - before if not m.startswith('cka_jax')))"
    )
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(cka_jax.__file__))}
    out = run_fresh(code, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
