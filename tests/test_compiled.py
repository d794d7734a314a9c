"""Every public measure runs as one compiled program without the caller's jit: its jaxpr is one jit
call, repeated calls with the same shapes do not retrace, and it gives the same values inside a
caller's jit, vmap and shard_map. `update(acts, acts)` builds each layer's gram once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

import cka_jax as ck
from cka_jax import MinibatchCKA

N, BATCH = 24, 16


def _rng(seed):
    return np.random.default_rng(seed)


def _pair(seed):
    """x: (N, 6), y: (N, 2, 3) float32, y partly a function of x."""
    rng = _rng(seed)
    x = rng.normal(size=(N, 6)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(6, 6))) + 0.5 * rng.normal(size=(N, 6))
    return x, y.reshape(N, 2, 3).astype(np.float32)


def _grams(seed):
    x, y = _pair(seed)
    return x @ x.T, y.reshape(N, -1) @ y.reshape(N, -1).T


def _acts(seed, models=None):
    """One minibatch of 3 layers (BATCH, ...), or (models, BATCH, ...)."""
    rng = _rng(seed)
    lead = (BATCH,) if models is None else (models, BATCH)
    return [rng.normal(size=lead + shape).astype(np.float32) for shape in ((4,), (2, 3), (5,))]


def _accumulator(seed, **create):
    return MinibatchCKA.create(3, num_bootstrap=5, seed=seed, **create).update(_acts(100 + seed))


# name -> (function of arrays and accumulators, arguments for a seed: same shapes, other values)
CALLS = {
    "linear_cka": (ck.linear_cka, _pair),
    "linear_cka-debiased": (lambda x, y: ck.linear_cka(x, y, debiased=True), _pair),
    "rbf_cka": (lambda x, y: ck.rbf_cka(x, y, 0.7), _pair),
    "cka": (lambda k, l: ck.cka(k, l, debiased=True), _grams),
    "hsic": (ck.hsic, _grams),
    "center_gram": (lambda k, l: ck.center_gram(k, unbiased=True), _grams),
    "gram_linear": (lambda x, y: ck.gram_linear(y), _pair),
    "gram_rbf": (lambda x, y: ck.gram_rbf(x, 2.0), _pair),
    "cca": (ck.cca, _pair),
    "mean_cca": (ck.mean_cca, _pair),
    "svcca": (ck.svcca, _pair),
    "svcca-keep-int": (lambda x, y: ck.svcca(x, y, keep=3), _pair),
    "pwcca": (ck.pwcca, _pair),
    "unit_correlations": (ck.unit_correlations, _pair),
    "first_pc_variance_fraction": (lambda x, y: ck.first_pc_variance_fraction(x), _pair),
    "first_pc_scores": (lambda x, y: ck.first_pc_scores(y), _pair),
    "first_pc_direction": (lambda x, y: ck.first_pc_direction(x), _pair),
    "remove_first_pc": (lambda x, y: ck.remove_first_pc(y), _pair),
    "first_pc_cosine_similarity": (lambda x, y: ck.first_pc_cosine_similarity([x, y]), _pair),
    "minibatch_grams": (ck.minibatch_grams, lambda seed: (_acts(seed),)),
    "MinibatchCKA.update": (MinibatchCKA.update, lambda seed: (_accumulator(seed), _acts(seed))),
    "MinibatchCKA.update-cross": (
        MinibatchCKA.update,
        lambda seed: (MinibatchCKA.create(3, 3, seed=seed), _acts(seed), _acts(seed + 50)),
    ),
    "MinibatchCKA.update-same-acts": (
        lambda acc, acts: acc.update(acts, acts),
        lambda seed: (MinibatchCKA.create(3, 3), _acts(seed)),
    ),
    "MinibatchCKA.update-population": (
        MinibatchCKA.update,
        lambda seed: (MinibatchCKA.create(3, num_models_a=2), _acts(seed, models=2)),
    ),
    "MinibatchCKA.update-rbf": (MinibatchCKA.update, lambda seed: (_accumulator(seed, kernel="rbf"), _acts(seed))),
    "MinibatchCKA.update_grams": (
        MinibatchCKA.update_grams,
        lambda seed: (_accumulator(seed), ck.minibatch_grams(_acts(seed))),
    ),
    "MinibatchCKA.merge": (MinibatchCKA.merge, lambda seed: (_accumulator(seed), _accumulator(seed + 1))),
    "MinibatchCKA.result": (MinibatchCKA.result, lambda seed: (_accumulator(seed),)),
    "MinibatchCKA.bootstrap_samples": (MinibatchCKA.bootstrap_samples, lambda seed: (_accumulator(seed),)),
    "MinibatchCKA.bootstrap_interval": (
        lambda acc: acc.bootstrap_interval(0.9),
        lambda seed: (_accumulator(seed).update(_acts(seed + 7)),),
    ),
}


def _assert_same(got, expected):
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7), got, expected)


@pytest.mark.parametrize("name", CALLS)
def test_eager_call_is_one_compiled_program(name):
    fn, args = CALLS[name]
    eqns = jax.make_jaxpr(fn)(*args(0)).eqns
    assert [e.primitive.name for e in eqns] == ["jit"], [e.primitive.name for e in eqns]


TRACES = "/jax/core/compile/jaxpr_trace_duration"


@pytest.mark.slow
@pytest.mark.parametrize("name", CALLS)
def test_repeated_eager_calls_do_not_retrace(name, jax_events):
    fn, args = CALLS[name]
    jax.block_until_ready(fn(*args(0)))
    inputs = [args(seed) for seed in (1, 2, 3)]
    with jax_events(TRACES) as traced:
        for a in inputs:
            jax.block_until_ready(fn(*a))
    assert traced == []


def test_an_eager_update_loop_traces_once(jax_events):
    """The accumulator an update returns has the leaf types of the one it was given."""
    batches = [_acts(seed) for seed in range(4)]
    acc = MinibatchCKA.create(3, 2, num_bootstrap=3, seed=9)
    with jax_events(TRACES) as traced:
        for acts in batches:
            acc = acc.update(acts, acts[1:])
    assert len(traced) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", CALLS)
def test_same_values_inside_jit(name):
    fn, args = CALLS[name]
    _assert_same(jax.jit(fn)(*args(4)), fn(*args(4)))


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


VMAPPED = [
    "linear_cka",
    "rbf_cka",
    "cka",
    "hsic",
    "mean_cca",
    "pwcca",
    "first_pc_scores",
    "remove_first_pc",
    "MinibatchCKA.update",
    "MinibatchCKA.update-population",
    "MinibatchCKA.update_grams",
    "MinibatchCKA.merge",
    "MinibatchCKA.result",
    "MinibatchCKA.bootstrap_interval",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", VMAPPED)
def test_same_values_under_vmap(name):
    """As cka_jax.analysis uses MinibatchCKA: one accumulator per model, vmapped."""
    fn, args = CALLS[name]
    inputs = [args(seed) for seed in (5, 6, 7)]
    _assert_same(jax.vmap(fn)(*_stack(inputs)), _stack([fn(*a) for a in inputs]))


@functools.cache
def _mesh():
    return jax.make_mesh((8,), ("batch",))


def _stacked_minibatches(seed, k=8):
    batches = [_acts(seed + i) for i in range(k)]
    return [np.stack([b[l] for b in batches]) for l in range(3)], batches


@pytest.mark.slow
@pytest.mark.parametrize("same", [False, True], ids=["within", "acts_b-is-acts_a"])
def test_update_sharded_eager_equals_jitted_and_sequential(same, jax_events):
    stacked, batches = _stacked_minibatches(10)
    acc = MinibatchCKA.create(3, num_bootstrap=4)

    def sharded(acc, stacked):
        return acc.update_sharded(stacked, stacked if same else None, mesh=_mesh())

    eager, jitted = sharded(acc, stacked), jax.jit(sharded)(acc, stacked)
    sequential = acc
    for acts in batches:
        sequential = sequential.update(acts, acts if same else None)
    _assert_same(jitted, eager)
    for field in ("xy", "xx", "yy", "boot_xy", "boot_xx", "boot_yy"):
        np.testing.assert_allclose(getattr(eager, field), getattr(sequential, field), rtol=1e-5)
    np.testing.assert_array_equal(eager.count, 8)
    later = _stacked_minibatches(30)[0]
    with jax_events(TRACES) as traced:
        jax.block_until_ready(sharded(acc, later))
    assert traced == []


def test_jitted_sharded_updates_chain():
    """A jitted update_sharded takes the accumulator an earlier jitted one returned (left on the
    mesh), and two chained updates equal the sequential loop over both halves."""
    first, batches_1 = _stacked_minibatches(40)
    second, batches_2 = _stacked_minibatches(50)
    step = jax.jit(lambda acc, stacked: acc.update_sharded(stacked, mesh=_mesh()))
    chained = step(step(MinibatchCKA.create(3), first), second)
    sequential = MinibatchCKA.create(3)
    for acts in batches_1 + batches_2:
        sequential = sequential.update(acts)
    np.testing.assert_allclose(chained.result(), sequential.result(), rtol=1e-5)
    np.testing.assert_array_equal(chained.count, 16)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def _gram_products(jaxpr, n):
    """Matrix products with an (..., n, n) result in the jaxpr as it runs when no layer needs a
    second, shifted gram (the cheapest branch of a cond): one per gram built (the all-pairs HSIC
    product is (layers, layers) and n is chosen to differ from every layer count)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-2:] == (n, n):
            total += 1
        inner = [_gram_products(sub, n) for sub in _subjaxprs(eqn)]
        total += (min(inner) if eqn.primitive.name == "cond" else sum(inner)) if inner else 0
    return total


def _grams_built(fn, *args):
    return _gram_products(jax.make_jaxpr(fn)(*args).jaxpr, BATCH)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("models", [None, 2], ids=["single", "population"])
def test_same_activations_build_each_gram_once(kernel, models):
    acts = _acts(11, models)
    copies = [a.copy() for a in acts]
    create = {} if models is None else {"num_models_a": models}
    acc = MinibatchCKA.create(3, 3, kernel=kernel, **create)
    assert _grams_built(lambda acc, a: acc.update(a), acc, acts) == 3
    assert _grams_built(lambda acc, a, b: acc.update(a, b), acc, acts, copies) == 6
    assert _grams_built(lambda acc, a: acc.update(a, a), acc, acts) == 3
    as_mapping = {f"layer{l}": a for l, a in enumerate(acts)}
    assert _grams_built(lambda acc, a: acc.update(a, a), acc, as_mapping) == 3
    _assert_same(acc.update(acts, acts), acc.update(acts, copies))


def test_update_sharded_with_the_same_activations_builds_each_gram_once():
    stacked, _ = _stacked_minibatches(12)
    acc = MinibatchCKA.create(3, 3)
    built = _grams_built(lambda acc, s: acc.update_sharded(s, s, mesh=_mesh()), acc, stacked)
    assert built == 3  # one scan body over the minibatches


def test_same_activations_keep_each_sides_own_scales():
    """After minibatches where model b was much smaller than model a, update(acts, acts) still
    equals passing copies: each side's grams in its own power-of-two units."""
    acc = MinibatchCKA.create(3, 3)
    for seed in range(2):
        acc = acc.update([1e12 * a for a in _acts(seed)], [1e-12 * a for a in _acts(seed + 20)])
    acts = _acts(13)
    same, copies = acc.update(acts, acts), acc.update(acts, [a.copy() for a in acts])
    np.testing.assert_array_equal(same.log2_scale_a, copies.log2_scale_a)
    np.testing.assert_array_equal(same.log2_scale_b, copies.log2_scale_b)
    assert not np.array_equal(same.log2_scale_a, same.log2_scale_b)
    np.testing.assert_allclose(same.result(), copies.result(), rtol=1e-6)
    np.testing.assert_allclose(same.yy, copies.yy, rtol=1e-6)
