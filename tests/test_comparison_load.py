"""cka_jax.load_comparison checks what a file holds, not only that its digest matches: a file whose
digest was recomputed after its contents changed (by hand, or by another program) is a one-line
ValueError naming what is wrong, never a comparison whose repr or plot then fails. The same
contents given to CKAComparison directly are a one-line ValueError naming the argument."""

import json

import numpy as np
import pytest

from cka_jax import CKAComparison, load_comparison
from cka_jax._compare.result import _arrays, _digest

LAYERS = ("conv", "block/conv", "dense")


def comparison(**fields):
    """A 3 x 3 comparison of one model with itself, with a 90% bootstrap interval."""
    heat = np.array([[1.0, 0.8, 0.5], [0.8, 1.0, 0.6], [0.5, 0.6, 1.0]])
    values = dict(
        heatmap=heat,
        layers_a=LAYERS,
        layers_b=LAYERS,
        num_examples=64,
        num_minibatches=4,
        interval=(heat - 0.1, np.minimum(heat + 0.1, 1.0)),
        name_a="mine",
        name_b="mine",
        level=0.9,
        num_bootstrap=50,
    )
    return CKAComparison(**{**values, **fields})


def with_meta(**fields):
    def change(arrays):
        meta = json.loads(str(arrays["meta"]))
        arrays["meta"] = np.array(json.dumps({**meta, **fields}))

    return change


def without_meta(key):
    def change(arrays):
        meta = json.loads(str(arrays["meta"]))
        del meta[key]
        arrays["meta"] = np.array(json.dumps(meta))

    return change


def with_array(key, value):
    def change(arrays):
        arrays[key] = value(arrays[key]) if callable(value) else value

    return change


def without(key):
    def change(arrays):
        del arrays[key]

    return change


# id: (change to the arrays save writes, text the one-line error must hold); the digest is
# recomputed after each change, as a program that rewrites the file would.
ROWS = {
    "complex-heatmap": (with_array("heatmap", lambda h: h.astype(np.complex128)), "heatmap must hold real floats"),
    "integer-heatmap": (with_array("heatmap", lambda h: h.astype(np.int64)), "heatmap must hold real floats"),
    "string-heatmap": (with_array("heatmap", lambda h: h.astype(str)), "heatmap must hold real floats"),
    "infinite-heatmap": (with_array("heatmap", lambda h: np.where(h == 1.0, np.inf, h)), "heatmap holds infinite"),
    "heatmap-shape": (with_array("heatmap", lambda h: h[:2]), "does not fit 3 x 3 layers"),
    "complex-interval": (
        with_array("interval_low", lambda h: h.astype(np.complex64)),
        "interval_low must hold real floats",
    ),
    "interval-shape": (with_array("interval_high", lambda h: h[:, :2]), "interval bounds must have"),
    "interval-low-above-high": (with_array("interval_low", lambda h: h + 0.5), "low bound lies above its high"),
    "interval-half": (without("interval_high"), "needs both interval_low and interval_high"),
    "interval-without-level": (with_meta(level=None), "an interval needs its level"),
    "interval-without-bootstrap": (with_meta(num_bootstrap=0), "an interval needs its level"),
    "negative-counts": (with_array("counts", np.array([-64, -4])), "num_examples=-64, num_minibatches=-4"),
    "zero-minibatches": (with_array("counts", np.array([64, 0])), "num_minibatches=0"),
    "fewer-examples-than-minibatches": (with_array("counts", np.array([3, 4])), "num_examples >= num_minibatches"),
    "float-counts": (with_array("counts", np.array([64.5, 4.0])), "counts must be 2 integers"),
    "three-counts": (with_array("counts", np.array([64, 4, 1])), "counts must be 2 integers"),
    "level-x": (with_meta(level="x"), "level must lie in (0, 1) or be None, got 'x'"),
    "level-1.5": (with_meta(level=1.5), "level must lie in (0, 1)"),
    "level-nan": (with_meta(level=float("nan")), "level must lie in (0, 1)"),
    "level-true": (with_meta(level=True), "meta field level must be a number"),
    "num_bootstrap-negative": (with_meta(num_bootstrap=-5), "num_bootstrap must be an integer >= 0"),
    "num_bootstrap-float": (with_meta(num_bootstrap=2.5), "num_bootstrap must be an integer >= 0"),
    "kernel-unknown": (with_meta(kernel="cosine"), "kernel must be 'linear' or 'rbf'"),
    "threshold-negative": (with_meta(threshold=-1.0), "threshold must be a positive finite number"),
    "threshold-string": (with_meta(threshold="1"), "threshold must be a positive finite number"),
    "debiased-string": (with_meta(debiased="yes"), "debiased must be True or False"),
    "population-1": (with_meta(population=1), "population must be True or False"),
    "all_pairs-without-population": (with_meta(all_pairs=True), "all_pairs=True needs population=True"),
    "name-number": (with_meta(name_a=7), "name_a must be a string"),
    "meta-field-missing": (without_meta("kernel"), "meta must hold the fields"),
    "meta-field-unknown": (with_meta(colour="red"), "meta must hold the fields"),
    "meta-not-an-object": (with_array("meta", np.array("[1, 2]")), "meta must hold the fields"),
    "meta-not-json": (with_array("meta", np.array("{kernel")), "not a valid CKA comparison file"),
    "meta-array": (with_array("meta", lambda m: np.array([str(m)])), "meta must be one string"),
    "layers-numbers": (with_array("layers_a", np.array([1, 2, 3])), "layers_a must be a list of names"),
    "layers-2d": (with_array("layers_b", lambda n: n[None]), "layers_b must be a list of names"),
    "layers-none": (with_array("layers_a", np.array([], str)), "layers_a must be one or more layer names"),
    "array-unknown": (with_array("extra", np.zeros(2)), "unexpected arrays ['extra']"),
    "array-missing": (without("counts"), "missing arrays ['counts']"),
}


def test_a_saved_comparison_loads_back(tmp_path):
    result = comparison()
    result.save(tmp_path / "cka.npz")
    back = load_comparison(tmp_path / "cka.npz")
    assert repr(back) == repr(result) and back.level == 0.9 and back.num_examples == 64
    np.testing.assert_array_equal(back.interval[0], result.interval[0])


@pytest.mark.parametrize("row", list(ROWS))
def test_a_file_with_a_recomputed_digest_is_checked_field_by_field(tmp_path, row):
    change, says = ROWS[row]
    arrays = _arrays(comparison())
    change(arrays)
    arrays["digest"] = np.array(_digest(arrays))
    path = tmp_path / "cka.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as error:
        load_comparison(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path} is not a valid CKA comparison file"), message
    assert says in message, message


@pytest.mark.parametrize(
    "fields, says",
    [
        (dict(heatmap=np.eye(3, dtype=np.complex128)), "heatmap must hold real numbers"),
        (dict(num_examples=-1), "num_examples=-1"),
        (dict(num_minibatches=2.0), "num_minibatches=2.0"),
        (dict(level="x"), "level must lie in (0, 1) or be None, got 'x'"),
        (dict(level=None), "an interval needs its level"),
        (dict(kernel="cosine"), "kernel must be 'linear' or 'rbf'"),
        (dict(layers_a="abc"), "layers_a must be one or more layer names"),
        (dict(name_b=None), "name_b must be a string"),
        (dict(threshold=float("inf")), "threshold must be a positive finite number"),
        (dict(debiased=False), "debiased=False (whole-set CKA) has neither"),
    ],
    ids=[
        "complex",
        "negative-examples",
        "float-minibatches",
        "level-x",
        "interval-no-level",
        "kernel",
        "layers-str",
        "name",
        "threshold-inf",
        "whole-set-interval",
    ],
)
def test_contents_no_comparison_can_have_are_a_one_line_error_naming_the_argument(fields, says):
    with pytest.raises(ValueError) as error:
        comparison(**fields)
    assert says in str(error.value) and "\n" not in str(error.value), str(error.value)
