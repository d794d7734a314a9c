"""Unit matching and sparse prediction (Li et al. 2016) against NumPy/brute-force references."""

import itertools

import numpy as np
import pytest

from cka_jax import UnitMatching, match_units, sparse_prediction_loss, unit_correlations

N, P = 400, 6


def _planted(seed=0, noise=0.3):
    """x: (N, P) and y: (N, P) = x's units permuted, rescaled and noisy; returns x, y, perm."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, P)) @ (np.eye(P) + 0.3 * rng.normal(size=(P, P)))
    perm = rng.permutation(P)
    y = x[:, perm] * rng.uniform(0.5, 2.0, size=P) + 1.0 + noise * rng.normal(size=(N, P))
    return x, y, perm


def test_unit_correlations_match_numpy_corrcoef():
    x, y, _ = _planted(1)
    y = y[:, :4]
    corr = unit_correlations(x.reshape(N, 2, 3), y)
    assert corr.shape == (P, 4)
    reference = np.corrcoef(x, y, rowvar=False)[:P, P:]
    np.testing.assert_allclose(corr, reference, atol=1e-5)


def test_zero_variance_unit_has_nan_correlation():
    x, y, _ = _planted(2)
    x[:, 3] = 0.7
    corr = np.asarray(unit_correlations(x, y))
    assert np.all(np.isnan(corr[3])) and np.all(np.isfinite(np.delete(corr, 3, axis=0)))


@pytest.mark.parametrize("method", ["bipartite", "semi"])
def test_recovers_planted_permutation(method):
    x, y, perm = _planted(3)
    matching = match_units(x, y, method=method)
    assert isinstance(matching, UnitMatching)
    # y unit j copies x unit perm[j]: x unit perm[j] matches y unit j.
    np.testing.assert_array_equal(matching.y_units[np.argsort(matching.x_units)], np.argsort(perm))
    assert np.all(matching.correlations > 0.9)


def test_bipartite_is_one_to_one_and_optimal_while_semi_repeats():
    rng = np.random.default_rng(4)
    shared = rng.normal(size=(N, 1))
    x = shared + 0.5 * rng.normal(size=(N, 4))
    y = np.concatenate([shared, rng.normal(size=(N, 4)) + 0.4 * x], axis=1)
    semi = match_units(x, y, method="semi")
    np.testing.assert_array_equal(semi.x_units, np.arange(4))
    assert len(set(semi.y_units)) < 4
    bipartite = match_units(x, y, method="bipartite")
    assert len(set(bipartite.y_units)) == len(bipartite.y_units) == 4
    corr = np.corrcoef(x, y, rowvar=False)[:4, 4:]
    best = max(corr[np.arange(4), list(cols)].sum() for cols in itertools.permutations(range(5), 4))
    np.testing.assert_allclose(bipartite.correlations.sum(), best, atol=1e-5)
    np.testing.assert_allclose(bipartite.correlations, corr[bipartite.x_units, bipartite.y_units], atol=1e-5)
    np.testing.assert_allclose(semi.correlations, corr.max(axis=1), atol=1e-5)


def test_dead_units_are_never_matched_ahead_of_real_ones():
    rng = np.random.default_rng(5)
    shared = rng.normal(size=(N, 1))
    x = shared + 0.1 * rng.normal(size=(N, 2))
    # Every real correlation is about -1, so a dead unit (NaN read as 0) would look better.
    y = np.concatenate([-shared + 0.1 * rng.normal(size=(N, 2)), np.zeros((N, 1))], axis=1)
    for method in ("bipartite", "semi"):
        matching = match_units(x, y, method=method)
        np.testing.assert_array_equal(matching.x_units, [0, 1])
        assert 2 not in matching.y_units
        assert np.all(matching.correlations < -0.9)
    x = np.concatenate([x, np.full((N, 1), 5.0)], axis=1)
    np.testing.assert_array_equal(match_units(x, y, method="semi").x_units, [0, 1])
    # One-to-one with 3 x units and 2 real y units: the dead pair is left out.
    np.testing.assert_array_equal(match_units(x, y, method="bipartite").x_units, [0, 1])


def test_unknown_method_lists_choices():
    x, y, _ = _planted(6)
    with pytest.raises(ValueError, match="bipartite.*semi"):
        match_units(x, y, method="greedy")
    with pytest.raises(ValueError, match=r"\(400, 6\).*\(399, 6\)"):
        match_units(x, y[:-1])


def test_sparse_prediction_loss_grows_with_penalty_and_copies_are_easy():
    x, y, _ = _planted(7, noise=0.05)
    penalties = [1.0, 1e-4, 0.1, 0.01]
    losses = sparse_prediction_loss(x, y, penalties)
    assert losses.shape == (4,)
    ordered = losses[np.argsort(penalties)]
    assert np.all(np.diff(ordered) > -1e-6)
    assert ordered[0] < 0.01
    assert ordered[-1] > 0.5
    # Unrelated units cannot be predicted: the held-out loss stays near the variance, 1.
    noise = np.random.default_rng(8).normal(size=(N, 3))
    assert sparse_prediction_loss(x, noise, [1e-3])[0] > 0.9
    # Units are standardised: rescaling and shifting them changes nothing.
    np.testing.assert_allclose(sparse_prediction_loss(10.0 * x - 3.0, 0.1 * y, penalties), losses, rtol=1e-6)
    np.testing.assert_array_equal(
        sparse_prediction_loss(x, y, [0.01], holdout=0.5, seed=1),
        sparse_prediction_loss(x, y, [0.01], holdout=0.5, seed=1),
    )


def test_sparse_prediction_loss_rejects_bad_arguments():
    x, y, _ = _planted(9)
    for penalties in ([], [0.0], [-1.0], [[0.1]]):
        with pytest.raises(ValueError, match="l1_penalties"):
            sparse_prediction_loss(x, y, penalties)
    with pytest.raises(ValueError, match="holdout"):
        sparse_prediction_loss(x, y, [0.1], holdout=1.0)
