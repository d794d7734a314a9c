"""Library misuse: one row per (public function, bad input). Refused inputs raise ValueError with
a message naming the argument; NaN or inf give NaN, never an exception or a finite number;
bool, integer and 16-bit float inputs are upcast."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cka_jax as ck
from cka_jax import MinibatchCKA

N = 20


@functools.cache
def _data():
    """x: (N, 5), y: (N, 4) float32 with small-integer values (exact in every accepted dtype)."""
    rng = np.random.default_rng(0)
    x = np.round(3 * rng.normal(size=(N, 5)))
    y = np.round(np.tanh(x @ rng.normal(size=(5, 4))) * 4 + rng.normal(size=(N, 4)))
    return x.astype(np.float32), y.astype(np.float32)


def _x():
    return _data()[0]


def _y():
    return _data()[1]


def _gram():
    return np.asarray(ck.gram_linear(_y()))


@functools.cache
def _sharded_update():
    mesh = jax.make_mesh((8,), ("batch",))
    return lambda acc, acts: acc.update_sharded(acts, mesh=mesh)


# Functions of one representation-like argument, the others valid: name -> (call, argument name
# in the message, takes grams (n, n) instead of representations (n, ...)).
REPRESENTATION = {
    "linear_cka(x)": (lambda b: ck.linear_cka(b, _y()), "x"),
    "linear_cka(y)": (lambda b: ck.linear_cka(_x(), b), "y"),
    "rbf_cka": (lambda b: ck.rbf_cka(b, _y()), "x"),
    "gram_linear": (lambda b: ck.gram_linear(b), "x"),
    "gram_rbf": (lambda b: ck.gram_rbf(b), "x"),
    "cca": (lambda b: ck.cca(b, _y()), "x"),
    "mean_cca(y)": (lambda b: ck.mean_cca(_x(), b), "y"),
    "svcca": (lambda b: ck.svcca(b, _y()), "x"),
    "svcca-keep-int": (lambda b: ck.svcca(_x(), b, keep=2), "y"),
    "pwcca": (lambda b: ck.pwcca(b, _y()), "x"),
    "unit_correlations": (lambda b: ck.unit_correlations(b, _y()), "x"),
    "match_units": (lambda b: ck.match_units(_x(), b), "y"),
    "sparse_prediction_loss": (lambda b: ck.sparse_prediction_loss(b, _y(), [0.1]), "x"),
    "first_pc_variance_fraction": (lambda b: ck.first_pc_variance_fraction(b), "x"),
    "first_pc_scores": (lambda b: ck.first_pc_scores(b), "x"),
    "first_pc_direction": (lambda b: ck.first_pc_direction(b), "x"),
    "remove_first_pc": (lambda b: ck.remove_first_pc(b), "x"),
    "first_pc_cosine_similarity": (lambda b: ck.first_pc_cosine_similarity([_x(), b]), r"xs\[1\]"),
    "minibatch_grams": (lambda b: ck.minibatch_grams([_x(), b]), r"acts\[1\]"),
    "MinibatchCKA.update": (lambda b: MinibatchCKA.create(2).update([b, _x()]), r"acts_a\[0\]"),
    "MinibatchCKA.update(acts_b)": (
        lambda b: MinibatchCKA.create(2, 2).update([_x(), _y()], [_y(), b]),
        r"acts_b\[1\]",
    ),
}
GRAM = {
    "cka": (lambda b: ck.cka(b, _gram()), "gram_x"),
    "cka(gram_y)": (lambda b: ck.cka(_gram(), b), "gram_y"),
    "hsic": (lambda b: ck.hsic(_gram(), b), "gram_y"),
    "center_gram": (lambda b: ck.center_gram(b), "gram"),
}


def _bad_representations():
    x = _x()
    return {
        "complex": (x.astype(np.complex64), "dtype complex64"),
        "string": (x.astype(str), "dtype <U"),
        "object": (x.astype(object), "dtype object"),
        "timedelta": (x.astype(np.int64).astype("m8[s]"), r"dtype timedelta64\[s\]"),
        "list": (x.tolist(), "Python list"),
        "no-examples": (x[:0], r"shape \(0, 5\)"),
        "no-features": (x[:, :0], r"shape \(20, 0\)"),
        "1-D": (x[:, 0], r"\(20,\)"),
        "scalar": (np.float32(1.0), r"\(\)"),
    }


def _bad_grams():
    g = _gram()
    return {
        "complex": (g.astype(np.complex64), "dtype complex64"),
        "string": (g.astype(str), "dtype <U"),
        "list": (g.tolist(), "Python list"),
        "empty": (g[:0, :0], r"shape \(0, 0\)"),
        "not-square": (g[:, :5], "square"),
        "1-D": (g[0], r"shape \(20,\)"),
    }


def _refusal_rows():
    for table, bads in ((REPRESENTATION, _bad_representations), (GRAM, _bad_grams)):
        for fn_name, (call, arg) in table.items():
            for bad_name in bads():
                yield pytest.param(call, bads, bad_name, arg, id=f"{fn_name}-{bad_name}")


@pytest.mark.parametrize("call, bads, bad_name, arg", list(_refusal_rows()))
def test_bad_input_raises_one_clear_value_error(call, bads, bad_name, arg):
    value, message = bads()[bad_name]
    with pytest.raises(ValueError, match=message) as info:
        call(value)
    text = str(info.value)
    assert "\n" not in text
    if bad_name not in ("not-square",):
        assert re.search(arg, text), text


# Other misuse, one row each: (call, message).
MISUSE = {
    "linear_cka-mismatched-n": (lambda: ck.linear_cka(_x(), _y()[:-1]), r"\(20, 5\).*\(19, 4\)"),
    "rbf_cka-mismatched-n": (lambda: ck.rbf_cka(_x()[:-1], _y()), r"\(19, 5\).*\(20, 4\)"),
    "cca-mismatched-n": (lambda: ck.cca(_x(), _y()[:-1]), r"\(20, 5\).*\(19, 4\)"),
    "unit_correlations-mismatched-n": (lambda: ck.unit_correlations(_x(), _y()[:-1]), r"\(20, 5\).*\(19, 4\)"),
    "sparse_prediction_loss-mismatched-n": (
        lambda: ck.sparse_prediction_loss(_x(), _y()[:-1], [0.1]),
        r"\(20, 5\).*\(19, 4\)",
    ),
    "first_pc_cosine_similarity-mismatched-n": (
        lambda: ck.first_pc_cosine_similarity([_x(), _y()[:-1]]),
        r"\(20, 5\).*\(19, 4\)",
    ),
    "first_pc_cosine_similarity-array": (
        lambda: ck.first_pc_cosine_similarity(np.stack([_x(), _x()])),
        "list of at least one",
    ),
    "cka-list-list": (lambda: ck.cka(_gram().tolist(), _gram().tolist()), "gram_x must be an array.*Python list"),
    "cka-mismatched-n": (lambda: ck.cka(_gram(), _gram()[:-1, :-1]), "same shape"),
    "cka-batched-grams": (lambda: ck.cka(_gram()[None], _gram()[None]), r"two \(n, n\) grams"),
    "cka-debiased-n3": (lambda: ck.cka(_gram()[:3, :3], _gram()[:3, :3], debiased=True), "n >= 4"),
    "hsic-mismatched-n": (lambda: ck.hsic(_gram(), _gram()[:-1, :-1]), "same shape"),
    "center_gram-unbiased-n3": (lambda: ck.center_gram(_gram()[:3, :3], unbiased=True), "n >= 4"),
    "gram_rbf-threshold-zero": (lambda: ck.gram_rbf(_x(), 0.0), "threshold"),
    "rbf_cka-threshold-nan": (lambda: ck.rbf_cka(_x(), _y(), float("nan")), "threshold"),
    "svcca-keep-nan": (lambda: ck.svcca(_x(), _y(), keep=float("nan")), "keep"),
    "svcca-epsilon-negative": (lambda: ck.svcca(_x(), _y(), epsilon=-1.0), "epsilon"),
    "cca-epsilon-nan": (lambda: ck.cca(_x(), _y(), epsilon=float("nan")), "epsilon"),
    "match_units-method": (lambda: ck.match_units(_x(), _y(), "greedy"), "unknown method 'greedy'"),
    "sparse_prediction_loss-penalty-inf": (
        lambda: ck.sparse_prediction_loss(_x(), _y(), [float("inf")]),
        "l1_penalties",
    ),
    "sparse_prediction_loss-penalty-text": (lambda: ck.sparse_prediction_loss(_x(), _y(), "abc"), "l1_penalties"),
    "sparse_prediction_loss-holdout-nan": (
        lambda: ck.sparse_prediction_loss(_x(), _y(), [0.1], float("nan")),
        "holdout",
    ),
    "sparse_prediction_loss-seed-text": (lambda: ck.sparse_prediction_loss(_x(), _y(), [0.1], seed="a"), "seed"),
    "MinibatchCKA.create-bool-layers": (lambda: MinibatchCKA.create(True), "num_layers_a must be a positive integer"),
    "MinibatchCKA.create-huge-permutations": (
        lambda: MinibatchCKA.create(1, num_permutations=2**70),
        "num_permutations=1180591620717411303424 is too large",
    ),
    "MinibatchCKA.create-huge-layers": (lambda: MinibatchCKA.create(2**31), "num_layers_a=2147483648 is too large"),
    "MinibatchCKA.create-bool-layers_b": (lambda: MinibatchCKA.create(2, True), "num_layers_b"),
    "MinibatchCKA.create-bool-models": (lambda: MinibatchCKA.create(2, num_models_a=True), "num_models_a"),
    "MinibatchCKA.create-float-layers": (lambda: MinibatchCKA.create(2.0), "num_layers_a"),
    "MinibatchCKA.create-bool-bootstrap": (lambda: MinibatchCKA.create(2, num_bootstrap=True), "num_bootstrap"),
    "MinibatchCKA.create-threshold-nan": (
        lambda: MinibatchCKA.create(2, kernel="rbf", threshold=float("nan")),
        "threshold",
    ),
    "MinibatchCKA.create-seed-text": (lambda: MinibatchCKA.create(2, seed="a"), "seed"),
    "MinibatchCKA.update-array-not-list": (lambda: MinibatchCKA.create(1).update(_x()), "list or a mapping"),
    "MinibatchCKA.update-layer-list": (
        lambda: MinibatchCKA.create(2).update([_x().tolist(), _x()]),
        r"acts_a\[0\] must be an array.*Python list",
    ),
    "MinibatchCKA.update-mismatched-n": (lambda: MinibatchCKA.create(2).update([_x(), _y()[:-1]]), "same examples"),
    "MinibatchCKA.update-n3": (lambda: MinibatchCKA.create(1).update([_x()[:3]]), "at least 4 examples"),
    "MinibatchCKA.update_grams-n3": (
        lambda: MinibatchCKA.create(2).update_grams(np.stack([_gram()[:3, :3]] * 2)),
        "at least 4 examples",
    ),
    "MinibatchCKA.update_grams-list": (
        lambda: MinibatchCKA.create(1).update_grams(_gram()[None].tolist()),
        "grams_a must be an array",
    ),
    "MinibatchCKA.update_grams-complex": (
        lambda: MinibatchCKA.create(1).update_grams(_gram()[None].astype(np.complex64)),
        "grams_a.*complex64",
    ),
    "MinibatchCKA.update_sharded-complex": (
        lambda: _sharded_update()(MinibatchCKA.create(1), [np.stack([_x()] * 8).astype(np.complex64)]),
        r"acts_a\[0\].*complex64",
    ),
    "MinibatchCKA.update_sharded-n3": (
        lambda: _sharded_update()(MinibatchCKA.create(1), [np.stack([_x()[:3]] * 8)]),
        "at least 4 examples",
    ),
    "MinibatchCKA.update_sharded-axis-name": (
        lambda: MinibatchCKA.create(1).update_sharded(
            [np.stack([_x()] * 8)], mesh=jax.make_mesh((8,), ("batch",)), axis_name="x"
        ),
        r"axis_name='x' is not an axis of the mesh; its axes are \('batch',\)",
    ),
    "MinibatchCKA.update_sharded-no-mesh": (
        lambda: MinibatchCKA.create(1).update_sharded([np.stack([_x()] * 8)], mesh=None),
        "mesh must be a jax.sharding.Mesh",
    ),
    "MinibatchCKA.create-seed-2**70": (lambda: MinibatchCKA.create(1, seed=2**70), "seed must fit in 64 bits"),
    "linear_cka-debiased-text": (lambda: ck.linear_cka(_x(), _y(), debiased="no"), "debiased must be True or False"),
    "rbf_cka-debiased-number": (lambda: ck.rbf_cka(_x(), _y(), debiased=0.5), "debiased must be True or False"),
    "cka-debiased-text": (lambda: ck.cka(_gram(), _gram(), debiased="yes"), "debiased must be True or False"),
    "hsic-unbiased-text": (lambda: ck.hsic(_gram(), _gram(), unbiased="no"), "unbiased must be True or False"),
    "center_gram-unbiased-text": (lambda: ck.center_gram(_gram(), unbiased="no"), "unbiased must be True or False"),
    "cka-asymmetric-gram": (lambda: ck.cka(np.triu(_gram()), _gram()), "gram_x is not symmetric"),
    "MinibatchCKA.update_grams-raw-gram": (
        lambda: MinibatchCKA.create(1).update_grams(_gram()[None]),
        "grams_a is not U-centred",
    ),
    "hsic-float64-beyond-float32": (lambda: ck.hsic(_gram().astype(np.float64) * 1e300, _gram()), "float32's range"),
    "gram_linear-float64-beyond-float32": (
        lambda: ck.gram_linear(_x().astype(np.float64) * 1e-300),
        "x holds float64 values .* outside float32's range",
    ),
    "MinibatchCKA.update-float64-beyond-float32": (
        lambda: MinibatchCKA.create(1).update([_x().astype(np.float64) * 1e300]),
        r"acts_a\[0\] holds float64 values",
    ),
    "compare-population-stream-without-features": (
        lambda: ck.compare(None, batches=[{"h": _x()}], population=True, progress=False),
        r"acts_a\['h'\] has shape \(20, 5\): in population mode",
    ),
    "compare-int64-input-beyond-int32": (
        lambda: ck.compare(lambda v: {"v": v * 1.0}, batches=[_x().astype(np.int64) + 2**40], progress=False),
        "the input of batch 0 holds int64 values .* beyond int32",
    ),
    "MinibatchCKA.merge-not-accumulator": (lambda: MinibatchCKA.create(1).merge("acc"), "another MinibatchCKA"),
    "MinibatchCKA.bootstrap_interval-level-nan": (
        lambda: MinibatchCKA.create(1, num_bootstrap=2).bootstrap_interval(float("nan")),
        "level",
    ),
    "MinibatchCKA.bootstrap_interval-level-bool": (
        lambda: MinibatchCKA.create(1, num_bootstrap=2).bootstrap_interval(True),
        "level",
    ),
}


@pytest.mark.parametrize("name", MISUSE)
def test_misuse_raises_one_clear_value_error(name):
    call, message = MISUSE[name]
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def _damaged(bad):
    x = _x().copy()
    x[3, 1] = bad
    return x


def _minibatch_rows(x):
    """CKA rows of the damaged layer 0 against clean layers, over two minibatches."""
    acc = MinibatchCKA.create(2, num_bootstrap=4)
    acc = acc.update([x, _x()[::-1]]).update([_x(), _x()[::-1]])
    low, high = acc.bootstrap_interval()
    return np.concatenate([np.asarray(acc.result())[0], np.asarray(low)[0], np.asarray(high)[0]])


def _population_row(x):
    acc = MinibatchCKA.create(1, num_models_a=2)
    return np.asarray(acc.update([np.stack([x, _x() * 2])]).result())[0]


# name -> the outputs that depend on the damaged value (all of them must be NaN).
NONFINITE = {
    "linear_cka": lambda x: ck.linear_cka(x, _y()),
    "linear_cka-debiased": lambda x: ck.linear_cka(x, _y(), debiased=True),
    "rbf_cka": lambda x: ck.rbf_cka(x, _y()),
    "cka": lambda x: ck.cka(ck.gram_linear(x), _gram()),
    "hsic": lambda x: ck.hsic(ck.gram_linear(x), _gram()),
    "center_gram": lambda x: ck.center_gram(np.asarray(ck.gram_linear(x))),
    "gram_linear": lambda x: ck.gram_linear(x)[:, 3],
    "gram_rbf": lambda x: ck.gram_rbf(x),
    "cca": lambda x: ck.cca(x, _y()).rho,
    "mean_cca": lambda x: ck.mean_cca(x, _y()),
    "svcca": lambda x: ck.svcca(x, _y()),
    "pwcca": lambda x: ck.pwcca(_y(), x),
    "unit_correlations": lambda x: ck.unit_correlations(x, _y())[1],
    "match_units": lambda x: ck.match_units(x, _y()).correlations,
    "match_units-semi": lambda x: ck.match_units(_y(), x, "semi").correlations,
    "sparse_prediction_loss": lambda x: ck.sparse_prediction_loss(x, _y(), [0.1, 1.0]),
    "sparse_prediction_loss(y)": lambda x: ck.sparse_prediction_loss(_y(), x, [0.1]),
    "first_pc_variance_fraction": lambda x: ck.first_pc_variance_fraction(x),
    "first_pc_scores": lambda x: ck.first_pc_scores(x),
    "first_pc_direction": lambda x: ck.first_pc_direction(x),
    "remove_first_pc": lambda x: ck.remove_first_pc(x),
    "first_pc_cosine_similarity": lambda x: ck.first_pc_cosine_similarity([x, _y()])[0],
    "minibatch_grams": lambda x: np.delete(np.asarray(ck.minibatch_grams([x]))[0, 3], 3),  # U-centred: 0 diagonal
    "MinibatchCKA": _minibatch_rows,
    "MinibatchCKA-population": _population_row,
    "MinibatchCKA.update_grams": lambda x: MinibatchCKA.create(1).update_grams(ck.minibatch_grams([x])).result(),
}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NONFINITE)
def test_nonfinite_input_gives_nan(name, bad):
    with np.errstate(invalid="ignore"):
        out = np.asarray(NONFINITE[name](_damaged(bad)), np.float64)
    assert out.size and np.all(np.isnan(out)), out


def test_match_units_with_damaged_data_keeps_its_pairs():
    matching = ck.match_units(_damaged(np.nan), _y())
    assert len(matching.x_units) == 4 and np.all(np.isnan(matching.correlations))


# Accepted dtypes: computed as float32 from the same values.
ACCEPTED = {
    "linear_cka": lambda a: ck.linear_cka(a, _y()),
    "rbf_cka": lambda a: ck.rbf_cka(_y(), a),
    "cka": lambda a: ck.cka(ck.gram_linear(_y()), a[:, :1] * a[:, :1].T),  # a square matrix in a's dtype
    "hsic": lambda a: ck.hsic(ck.gram_linear(_y()), a[:, :1] * a[:, :1].T) / 1e3,
    "gram_linear": lambda a: ck.gram_linear(a) / 1e3,
    "svcca": lambda a: ck.svcca(a, _y()),
    "pwcca": lambda a: ck.pwcca(a, _y()),
    "unit_correlations": lambda a: np.nan_to_num(ck.unit_correlations(a, _y()), nan=9.0),
    "match_units": lambda a: ck.match_units(a, _y()).correlations,
    "sparse_prediction_loss": lambda a: ck.sparse_prediction_loss(a, _y(), [0.1]),
    "first_pc_variance_fraction": lambda a: ck.first_pc_variance_fraction(a),
    "remove_first_pc": lambda a: ck.remove_first_pc(a) / 10,
    "minibatch_grams": lambda a: ck.minibatch_grams([a]) / 1e3,
    "MinibatchCKA.update": lambda a: MinibatchCKA.create(2).update([a, _y()]).result(),
}
DTYPES = {
    "bool": np.bool_,
    "int8": np.int8,
    "int32": np.int32,
    "uint8": np.uint8,
    "float16": np.float16,
    "bfloat16": jnp.bfloat16,
}


def _values(dtype):
    x = _x()
    if dtype is np.bool_:
        return x > 0
    return np.abs(x).astype(dtype) if dtype is np.uint8 else x.astype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", ACCEPTED)
def test_narrow_real_dtypes_are_upcast(name, dtype):
    values = _values(dtype)
    got = np.asarray(ACCEPTED[name](values), np.float64)
    expected = np.asarray(ACCEPTED[name](np.asarray(values, np.float32)), np.float64)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["linear_cka", "svcca", "first_pc_variance_fraction", "MinibatchCKA.update", "gram_linear"]
)
def test_float64_stays_float64_with_x64(x64, name):
    out = ACCEPTED[name](_x().astype(np.float64))
    assert jnp.asarray(out).dtype == jnp.float64
