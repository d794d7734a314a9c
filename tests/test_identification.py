"""layer_identification against a plain NumPy reference loop and hand-made cases (ties, NaN)."""

import numpy as np
import pytest

from cka_jax import layer_identification


def _reference(s):
    """The paper's rule written as loops: layer i of a is found iff S[a, b, i, i] is the unique maximum."""
    m, _, num_layers, _ = s.shape
    hits = trials = 0
    for a in range(m):
        for b in range(m):
            if a == b:
                continue
            for i in range(num_layers):
                trials += 1
                best = max(s[a, b, i])
                hits += s[a, b, i, i] == best and sum(v == best for v in s[a, b, i]) == 1
    return hits / trials


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, size=(3, 3, 5, 5)).astype(float)  # small integers: many ties
    s += 2 * np.eye(5) * rng.integers(0, 2, size=(3, 3, 5, 1))
    result = layer_identification(s)
    assert result.accuracy == pytest.approx(_reference(s))
    assert result.num_trials == 3 * 2 * 5 and result.num_undefined == 0
    assert np.isnan(result.correct[[0, 1, 2], [0, 1, 2]]).all()


def test_known_values_and_ties():
    s = np.zeros((2, 2, 3, 3))
    s[0, 1] = [[1.0, 0.5, 0.2], [0.2, 0.9, 0.9], [0.1, 0.2, 0.3]]  # row 1 ties: wrong
    s[1, 0] = [[0.1, 0.5, 0.2], [0.2, 0.9, 0.1], [0.1, 0.2, 0.3]]  # row 0 wrong
    result = layer_identification(s)
    np.testing.assert_array_equal(result.correct[0, 1], [1, 0, 1])
    np.testing.assert_array_equal(result.correct[1, 0], [0, 1, 1])
    assert result.accuracy == pytest.approx(4 / 6)
    identity = np.tile(np.eye(4), (3, 3, 1, 1))
    assert layer_identification(identity).accuracy == 1.0
    assert layer_identification(np.ones((3, 3, 4, 4))).accuracy == 0.0  # all ties


def test_undefined_entries_are_never_correct():
    s = np.tile(np.eye(3), (2, 2, 1, 1))
    s[0, 1, 2, 0] = np.nan
    s[0, 0, 1, 1] = np.nan  # a == b: not read
    result = layer_identification(s)
    assert np.isnan(result.accuracy) and result.num_undefined == 1
    assert np.isnan(result.correct[0, 1, 2])
    counted = layer_identification(s, undefined="wrong")
    assert counted.accuracy == pytest.approx(5 / 6) and counted.num_undefined == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 2, 3)), "shape"),
        (np.zeros((2, 3, 3, 3)), "shape"),
        (np.zeros((1, 1, 3, 3)), "at least 2 models"),
        (np.zeros((2, 2, 1, 1)), "at least 2 models"),
        (np.array([[[["a"]]]]), "real numbers"),
    ],
)
def test_misuse(bad, match):
    with pytest.raises(ValueError, match=match):
        layer_identification(bad)
    with pytest.raises(ValueError, match="undefined"):
        layer_identification(np.zeros((2, 2, 2, 2)), undefined="skip")
