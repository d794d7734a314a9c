"""Every public measure is unchanged (or scales as its definition says) when inputs are multiplied
by 1e-30 .. 1e30 in float32: different scales for x and y, for each layer, and for each model."""

import functools

import jax
import numpy as np
import pytest
import reference as ref

import cka_jax as ck
from cka_jax import MinibatchCKA

SCALES = (1e-30, 1e-20, 1e-10, 1e-4, 1.0, 1e4, 1e10, 1e20, 1e30)
F32 = np.finfo(np.float32)
N = 48


@functools.cache
def _pair():
    """x: (N, 6), y: (N, 5) float32, y partly a function of x (CKA, CCA well away from 0 and 1)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)) * np.linspace(0.5, 2.0, 6) + 3.0
    y = np.tanh(x @ rng.normal(size=(6, 5))) + 0.5 * rng.normal(size=(N, 5))
    return x.astype(np.float32), y.astype(np.float32)


@functools.cache
def _batches(models=None):
    """4 minibatches x 3 layers of (16, 4, 3) activations ((models, 16, 4, 3) in population mode)."""
    rng = np.random.default_rng(1)
    lead = (16,) if models is None else (models, 16)
    out = []
    for _ in range(4):
        h = rng.normal(size=lead + (4, 3))
        layers = []
        for _ in range(3):
            h = np.tanh(h @ rng.normal(size=(3, 3))) + 0.3 * rng.normal(size=h.shape)
            layers.append(h.astype(np.float32))
        out.append(layers)
    return out


def _f32(a, s):
    """a·s in float32, computed in float64 so that only the result is rounded."""
    return (np.asarray(a, np.float64) * s).astype(np.float32)


def _layer_scales(sx, sy):
    return (sx, sy, 1.0)


def _scaled_batches(sx, sy, models=None):
    """Layer l of every minibatch times _layer_scales[l]; in population mode model m's layer l
    times _layer_scales[(m + l) % 3], so models differ too."""
    scales = _layer_scales(sx, sy)
    out = []
    for layers in _batches(models):
        if models is None:
            out.append([_f32(a, scales[l]) for l, a in enumerate(layers)])
        else:
            factors = [
                np.array([scales[(m + l) % 3] for m in range(models)]).reshape(models, 1, 1, 1) for l in range(3)
            ]
            out.append([_f32(a, factors[l]) for l, a in enumerate(layers)])
    return out


def _accumulate(acc, batches, batches_b=None):
    for i, layers in enumerate(batches):
        acc = acc.update(layers, None if batches_b is None else batches_b[i])
    return acc


def _minibatch(sx, sy, **create):
    return _accumulate(MinibatchCKA.create(3, **create), _scaled_batches(sx, sy))


def _cross(sx, sy):
    batches_a = _scaled_batches(sx, sy)
    batches_b = [[_f32(layers[2], sy), _f32(np.tanh(layers[0]), sx)] for layers in _batches()]
    return _accumulate(MinibatchCKA.create(3, 2), batches_a, batches_b).result()


def _population(sx, sy):
    return _accumulate(MinibatchCKA.create(3, num_models_a=3), _scaled_batches(sx, sy, models=3)).result()


def _update_grams(sx, sy):
    acc = MinibatchCKA.create(3)
    for layers in _batches():
        grams = np.asarray(ck.minibatch_grams(layers), np.float64)
        acc = acc.update_grams(np.stack([_f32(g, s) for g, s in zip(grams, _layer_scales(sx, sy), strict=True)]))
    return acc.result()


@functools.cache
def _update_sharded():
    """Jitted update_sharded over 8 devices (compiled once per shape; eagerly it retraces per call)."""
    mesh = jax.make_mesh((8,), ("batch",))
    return jax.jit(lambda acc, acts: acc.update_sharded(acts, mesh=mesh))


def _sharded(sx, sy):
    batches = _scaled_batches(sx, sy) * 2  # 8 minibatches, one per device
    stacked = [np.stack([b[l] for b in batches]) for l in range(3)]
    return _update_sharded()(MinibatchCKA.create(3, num_bootstrap=4), stacked).result()


def _merge(sx, sy):
    batches = _scaled_batches(sx, sy)
    a = _accumulate(MinibatchCKA.create(3, num_bootstrap=4, seed=0), batches[:1])
    b = _accumulate(MinibatchCKA.create(3, num_bootstrap=4, seed=1), batches[1:])
    return a.merge(b).result()


def _grams(sx, sy):
    x, y = _pair()
    return _f32(ck.gram_linear(x), sx), _f32(ck.gram_linear(y), sy)


def _cca(sx, sy, field):
    x, y = _pair()
    return getattr(ck.cca(_f32(x, sx), _f32(y, sy)), field)


def _matching(sx, sy, method):
    x, y = _pair()
    m = ck.match_units(_f32(x, sx), _f32(np.concatenate([y, x[:, :2]], 1), sy), method)
    return np.concatenate([m.x_units, m.y_units, m.correlations])


def _xy(fn):
    """fn(x, y) of the pair scaled by (sx, sy)."""

    def call(sx, sy):
        x, y = _pair()
        return fn(_f32(x, sx), _f32(y, sy))

    return call


def _x(fn):
    """fn(x) of x scaled by sx."""
    return lambda sx, sy: fn(_f32(_pair()[0], sx))


def _compare(sx, sy, debiased=True):
    """cka_jax.compare on the scaled minibatches as an activation stream (a function model too)."""
    stream = [{f"layer{l}": a for l, a in enumerate(layers)} for layers in _scaled_batches(sx, sy)]
    if not debiased:
        return ck.compare(None, None, stream, debiased=False, progress=False).heatmap
    inputs = [np.stack(layers, axis=1) for layers in _scaled_batches(sx, sy)]  # (16, 3, 4, 3)
    by_function = ck.compare(lambda x: {f"layer{l}": x[:, l] for l in range(3)}, None, inputs, progress=False).heatmap
    by_stream = ck.compare(None, None, stream, progress=False).heatmap
    np.testing.assert_array_equal(by_function, by_stream)
    return by_stream


# (id, public name, fn(sx, sy), units(sx, sy) -> factor the output scales by; None: invariant,
#  inputs: 1 when only sx is used)
ROWS = [
    ("linear_cka", "linear_cka", _xy(ck.linear_cka), None, 2),
    ("linear_cka-debiased", "linear_cka", _xy(lambda x, y: ck.linear_cka(x, y, debiased=True)), None, 2),
    ("linear_cka-gram-form", "linear_cka", _xy(lambda x, y: ck.linear_cka(x[:8], y[:8])), None, 2),
    ("rbf_cka", "rbf_cka", _xy(ck.rbf_cka), None, 2),
    ("rbf_cka-debiased", "rbf_cka", _xy(lambda x, y: ck.rbf_cka(x, y, 0.5, debiased=True)), None, 2),
    ("cka", "cka", lambda sx, sy: ck.cka(*_grams(sx, sy)), None, 2),
    ("cka-debiased", "cka", lambda sx, sy: ck.cka(*_grams(sx, sy), debiased=True), None, 2),
    ("hsic", "hsic", lambda sx, sy: ck.hsic(*_grams(sx, sy)), lambda sx, sy: sx * sy, 2),
    ("hsic-unbiased", "hsic", lambda sx, sy: ck.hsic(*_grams(sx, sy), unbiased=True), lambda sx, sy: sx * sy, 2),
    ("center_gram", "center_gram", lambda sx, sy: ck.center_gram(_grams(sx, sy)[0]), lambda sx, sy: sx, 1),
    (
        "center_gram-unbiased",
        "center_gram",
        lambda sx, sy: ck.center_gram(_grams(sx, sy)[0], unbiased=True),
        lambda sx, sy: sx,
        1,
    ),
    ("gram_linear", "gram_linear", _x(ck.gram_linear), lambda sx, sy: sx**2, 1),
    ("gram_rbf", "gram_rbf", _x(ck.gram_rbf), None, 1),
    (
        "minibatch_grams",
        "minibatch_grams",
        lambda sx, sy: ck.minibatch_grams(_scaled_batches(sx, sy)[0]),
        lambda sx, sy: np.array(_layer_scales(sx, sy))[:, None, None] ** 2,
        2,
    ),
    ("MinibatchCKA.update", "MinibatchCKA", lambda sx, sy: _minibatch(sx, sy).result(), None, 2),
    ("MinibatchCKA.update-rbf", "MinibatchCKA", lambda sx, sy: _minibatch(sx, sy, kernel="rbf").result(), None, 2),
    ("MinibatchCKA.update-cross", "MinibatchCKA", _cross, None, 2),
    ("MinibatchCKA.update-population", "MinibatchCKA", _population, None, 2),
    ("MinibatchCKA.update_grams", "MinibatchCKA", _update_grams, None, 2),
    ("MinibatchCKA.update_sharded", "MinibatchCKA", _sharded, None, 2),
    ("MinibatchCKA.merge", "MinibatchCKA", _merge, None, 2),
    (
        "MinibatchCKA.bootstrap_samples",
        "MinibatchCKA",
        lambda sx, sy: _minibatch(sx, sy, num_bootstrap=8).bootstrap_samples(),
        None,
        2,
    ),
    (
        "MinibatchCKA.bootstrap_interval",
        "MinibatchCKA",
        lambda sx, sy: np.stack(_minibatch(sx, sy, num_bootstrap=8).bootstrap_interval()),
        None,
        2,
    ),
    ("compare", "compare", _compare, None, 2),
    ("compare-whole-set", "compare", functools.partial(_compare, debiased=False), None, 2),
    ("cca.rho", "cca", functools.partial(_cca, field="rho"), None, 2),
    ("cca.num_valid", "cca", functools.partial(_cca, field="num_valid"), None, 2),
    ("cca.x_variates", "cca", functools.partial(_cca, field="x_variates"), None, 2),
    ("cca.y_variates", "cca", functools.partial(_cca, field="y_variates"), None, 2),
    ("cca.x_weights", "cca", functools.partial(_cca, field="x_weights"), lambda sx, sy: sx, 2),
    ("mean_cca", "mean_cca", _xy(ck.mean_cca), None, 2),
    ("svcca", "svcca", _xy(ck.svcca), None, 2),
    ("svcca-keep-int", "svcca", _xy(lambda x, y: ck.svcca(x, y, keep=4)), None, 2),
    ("pwcca", "pwcca", _xy(ck.pwcca), None, 2),
    ("pwcca-swapped", "pwcca", _xy(lambda x, y: ck.pwcca(y, x)), None, 2),
    ("unit_correlations", "unit_correlations", _xy(ck.unit_correlations), None, 2),
    ("match_units-bipartite", "match_units", functools.partial(_matching, method="bipartite"), None, 2),
    ("match_units-semi", "match_units", functools.partial(_matching, method="semi"), None, 2),
    (
        "sparse_prediction_loss",
        "sparse_prediction_loss",
        _xy(lambda x, y: ck.sparse_prediction_loss(x, y, [0.01, 0.1])),
        None,
        2,
    ),
    ("first_pc_variance_fraction", "first_pc_variance_fraction", _x(ck.first_pc_variance_fraction), None, 1),
    ("first_pc_scores", "first_pc_scores", _x(ck.first_pc_scores), None, 1),
    ("first_pc_direction", "first_pc_direction", _x(ck.first_pc_direction), None, 1),
    ("remove_first_pc", "remove_first_pc", _x(ck.remove_first_pc), lambda sx, sy: sx, 1),
    (
        "first_pc_cosine_similarity",
        "first_pc_cosine_similarity",
        lambda sx, sy: ck.first_pc_cosine_similarity([_f32(_pair()[0], sx), _f32(_pair()[1], sy)]),
        None,
        2,
    ),
]
# what cca, match_units, compare and layer_identification return
RESULT_TYPES = {"CCAResult", "UnitMatching", "CKAComparison", "LayerIdentification"}
READERS = {"load_comparison"}  # reads a saved CKAComparison back: no measure to scale
SCORERS = {"layer_identification"}  # scores given similarity matrices (an argmax per row): no representation


def _cases():
    for row in ROWS:
        pairs = [(s, s) for s in SCALES]
        if row[4] == 2:
            pairs += [(s, 1 / s) for s in SCALES if s != 1.0]
        for sx, sy in pairs:
            yield pytest.param(row, sx, sy, id=f"{row[0]}-x{sx:g}-y{sy:g}")


@functools.cache
def _at_unit_scale(row_id):
    row = next(r for r in ROWS if r[0] == row_id)
    return np.asarray(row[2](1.0, 1.0), np.float64)


def _assert_scaled(got, base, factor):
    """got ≈ base·factor rounded to float32: ±inf beyond float32's range, ~0 below its normal
    range, otherwise within 1e-4 of the largest entry's magnitude."""
    expected = base * np.asarray(factor, np.float64)
    finite = np.abs(expected) < float(F32.max) * (1 - 1e-4)
    overflow = np.abs(expected) > float(F32.max) * (1 + 1e-4)
    assert np.all(np.isinf(got[overflow]) & (np.sign(got[overflow]) == np.sign(expected[overflow])))
    scale = np.max(np.abs(expected[finite]), initial=0.0)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-4 * scale + 2 * float(F32.tiny))


@pytest.mark.slow
@pytest.mark.parametrize("row, sx, sy", list(_cases()))
def test_measure_is_scale_invariant_or_equivariant(row, sx, sy):
    row_id, _, fn, units, _ = row
    base = _at_unit_scale(row_id)
    assert np.all(np.isfinite(base)), "the unit-scale value must be defined for the comparison to mean anything"
    got = np.asarray(fn(sx, sy), np.float64)
    assert got.shape == base.shape
    if units is None:
        np.testing.assert_allclose(got, base, rtol=0, atol=1e-4)
    else:
        _assert_scaled(got, base, units(sx, sy))


def test_every_public_name_is_covered():
    covered = {row[1] for row in ROWS} | RESULT_TYPES | READERS | SCORERS
    assert set(ck.__all__) == covered, set(ck.__all__) ^ covered


# Minibatches whose scales change from one minibatch to the next change the CKA itself (each
# minibatch's weight scales with it): the accumulator must still match float64 arithmetic.
GROWING = {
    "tiny-then-huge": (1e-30, 1.0, 1e30, 1e10),
    "huge-then-tiny": (1e30, 1e-30, 1.0, 1e-10),
    "ordinary": (1.0, 2.0, 0.5, 1.0),
}


def _per_batch(scales):
    return [[_f32(a, s) for a in layers] for layers, s in zip(_batches(), scales, strict=True)]


def _reference(batches):
    return ref.minibatch_cka(
        [[np.asarray(a, np.float64) for a in b] for b in batches],
        [[np.asarray(a, np.float64) for a in b] for b in batches],
    )


@pytest.mark.parametrize("scales", GROWING.values(), ids=GROWING.keys())
def test_update_with_changing_scales_matches_float64(scales):
    batches = _per_batch(scales)
    np.testing.assert_allclose(_accumulate(MinibatchCKA.create(3), batches).result(), _reference(batches), atol=1e-4)


@pytest.mark.parametrize("scales", GROWING.values(), ids=GROWING.keys())
def test_merge_of_differently_scaled_accumulators_matches_float64(scales):
    batches = _per_batch(scales)
    a = _accumulate(MinibatchCKA.create(3), batches[:2])
    b = _accumulate(MinibatchCKA.create(3), batches[2:])
    assert not np.array_equal(a.log2_scale_a, b.log2_scale_a) or scales == GROWING["ordinary"]
    np.testing.assert_allclose(a.merge(b).result(), _reference(batches), atol=1e-4)
    np.testing.assert_allclose(b.merge(a).result(), _reference(batches), atol=1e-4)


@pytest.mark.parametrize("scales", GROWING.values(), ids=GROWING.keys())
def test_sharded_with_differently_scaled_devices_equals_sequential(scales):
    batches = _per_batch(scales) * 2
    stacked = [np.stack([b[l] for b in batches]) for l in range(3)]
    sequential = _accumulate(MinibatchCKA.create(3, num_bootstrap=4), batches)
    sharded = _update_sharded()(MinibatchCKA.create(3, num_bootstrap=4), stacked)
    np.testing.assert_allclose(sharded.result(), sequential.result(), atol=1e-5)
    np.testing.assert_allclose(sharded.bootstrap_samples(), sequential.bootstrap_samples(), atol=1e-5)
    np.testing.assert_array_equal(sharded.log2_scale_a, sequential.log2_scale_a)
    np.testing.assert_allclose(sharded.result(), _reference(batches), atol=1e-4)


def test_diagonal_survives_large_and_small_activations():
    """The reported case: one layer of 256x8x8x32 activations times 1e4 lost its diagonal (CKA 0),
    times 1e-6 gave inf."""
    rng = np.random.default_rng(2)
    base = rng.normal(size=(256, 8, 8, 32)).astype(np.float32)
    for scale in (1e-6, 1e4, 1e30):
        acts = [_f32(base, scale), np.tanh(base), _f32(base[..., ::-1], 1 / scale)]
        heatmap = np.asarray(MinibatchCKA.create(3).update(acts).result())
        np.testing.assert_allclose(np.diag(heatmap), 1.0, atol=1e-5)


# Float64 NumPy references (tests/reference.py) at ordinary scale, for the measures they cover.
def _ref_pair():
    x, y = _pair()
    return x, y, ref.gram_linear(x), ref.gram_linear(y)


REFERENCES = {
    "linear_cka": (lambda x, y, k, l: ck.linear_cka(x, y), lambda x, y, k, l: ref.cka(k, l)),
    "linear_cka-debiased": (lambda x, y, k, l: ck.linear_cka(x, y, True), lambda x, y, k, l: ref.cka(k, l, True)),
    "rbf_cka": (lambda x, y, k, l: ck.rbf_cka(x, y), lambda x, y, k, l: ref.cka(ref.gram_rbf(x), ref.gram_rbf(y))),
    "cka": (lambda x, y, k, l: ck.cka(k.astype(np.float32), l.astype(np.float32)), lambda x, y, k, l: ref.cka(k, l)),
    "hsic": (
        lambda x, y, k, l: ck.hsic(k.astype(np.float32), l.astype(np.float32)),
        lambda x, y, k, l: ref.hsic0(k, l),
    ),
    "hsic-unbiased": (
        lambda x, y, k, l: ck.hsic(k.astype(np.float32), l.astype(np.float32), True),
        lambda x, y, k, l: ref.hsic1(k, l),
    ),
    "gram_rbf": (lambda x, y, k, l: ck.gram_rbf(x), lambda x, y, k, l: ref.gram_rbf(x)),
    "MinibatchCKA": (lambda x, y, k, l: _minibatch(1.0, 1.0).result(), lambda x, y, k, l: _reference(_batches())),
}


@pytest.mark.parametrize("name", REFERENCES)
def test_ordinary_scale_matches_float64_reference(name):
    ours, theirs = REFERENCES[name]
    np.testing.assert_allclose(ours(*_ref_pair()), theirs(*_ref_pair()), rtol=1e-4, atol=1e-5)
