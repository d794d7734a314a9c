"""Undefined values on planted data: NaN in, "undefined (reason)" out; never 0, "no block" or a
plausible number (bootstrap, intervals, JSON, layer status, probes, deletion, CCA, unit matching,
principal components)."""

import os
from collections import OrderedDict

import numpy as np
import pytest

from cka_jax.analysis import cca_measures, probes
from cka_jax.analysis.bootstrap import bootstrap_mean
from cka_jax.analysis.outputs import write_json


def test_bootstrap_leaves_out_rows_with_undefined_values():
    values = np.random.default_rng(0).normal(0.5, 0.1, size=(6, 3))
    values[2, 0] = np.nan
    mean, low, high = bootstrap_mean(values, 200)
    np.testing.assert_allclose(mean, np.delete(values, 2, 0).mean(0))
    assert (low <= mean).all() and (mean <= high).all()
    assert all(np.isnan(a).all() for a in bootstrap_mean(np.full((4, 2), np.nan)))


@pytest.mark.parametrize(
    "mean, expected",
    [(np.nan, "undefined (why)"), (np.inf, "undefined (why)"), (0.5, "0.500 [0.400, 0.600]")],
    ids=["nan", "inf", "finite"],
)
def test_intervals_say_undefined(mean, expected):
    from cka_jax.analysis.bootstrap import format_interval

    assert format_interval(mean, 0.4, 0.6, 3, "why") == expected


def test_json_outputs_write_undefined_numbers_as_null(tmp_path):
    import json

    path = write_json(
        str(tmp_path / "x.json"), {"a": float("nan"), "b": np.array([1.0, np.inf]), "c": np.float32("nan"), "d": [0.5]}
    )
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None, "d": [0.5]}


def test_layer_status_names_non_finite_models_and_constant_layers():
    from cka_jax.analysis.undefined import LayerStatus, left_out

    rng = np.random.default_rng(0)
    reps = OrderedDict(stem=rng.normal(size=(3, 10, 4)), b1=rng.normal(size=(3, 10, 2, 2, 4)))
    reps["stem"][1, 3, 0] = np.nan
    reps["b1"][2] = 7.0
    status = LayerStatus.of(reps)
    assert status.defined.tolist() == [[True, True], [False, True], [True, False]]
    assert status.why([0]) == "" and status.why([1]) == "non-finite activations in seed 1"
    assert status.why([2]) == "constant layer b1 in seed 2"
    note = left_out(status.defined.all(1), lambda m: status.why([m]))
    assert note == (
        "mean over 1 of 3 seeds: seeds 1, 2 left out as undefined (non-finite activations in seed 1; "
        "constant layer b1 in seed 2)"
    )
    assert left_out(np.zeros(2, bool), lambda m: "x").startswith("undefined for every seed")


def test_probes_of_non_finite_features_are_undefined_not_chance():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(2, 60, 5)), rng.normal(size=(2, 30, 5))
    train[1, 4, 2] = np.nan
    acc = probes.probe_accuracy(train, rng.integers(0, 3, 60), test, rng.integers(0, 3, 30), 3, steps=5)
    assert np.isfinite(acc[0]) and np.isnan(acc[1])


def test_deletion_accuracy_of_non_finite_logits_is_undefined():
    from cka_jax.analysis.deletion import accuracy

    logits = np.zeros((2, 4, 3))
    logits[:, :, 0] = 1
    logits[1, 2, 1] = np.nan
    np.testing.assert_array_equal(accuracy(logits, np.array([0, 0, 1, 2])), [0.5, np.nan])


@pytest.mark.parametrize("damage", ["nan", "inf", "constant"])
def test_cca_measures_of_a_non_finite_or_constant_layer_are_undefined(damage):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 80, 4)).astype(np.float32), rng.normal(size=(3, 80, 4)).astype(np.float32)
    if damage == "constant":
        x[1] = 2.0
    else:
        x[1, 5, 1] = np.nan if damage == "nan" else np.inf
    for measure in ("svcca", "pwcca", "cka"):
        values = cca_measures.similarity(measure, x, y)
        assert np.isfinite(values[[0, 2]]).all() and np.isnan(values[1]), measure


def test_unit_matching_and_sparse_prediction_of_undefined_layers_are_undefined():
    from cka_jax.analysis import unit_matching

    rng = np.random.default_rng(0)
    a = OrderedDict(l1=rng.normal(size=(40, 3)), l2=rng.normal(size=(40, 3)))
    b = OrderedDict(l1=a["l1"] + 0.1 * rng.normal(size=(40, 3)), l2=np.full((40, 3), np.nan))
    curves = unit_matching.matching_curves(a, b)
    assert unit_matching.mean_matched(curves["l1"]["bipartite"]) > 0.9
    assert np.isnan(unit_matching.mean_matched(curves["l2"]["bipartite"]))
    assert unit_matching.padded(curves, "semi").shape == (2, 3)
    losses = unit_matching.sparse_losses(a, b, (0.01, 0.1))
    assert np.isfinite(losses[0]).all() and np.isnan(losses[1]).all()


def test_principal_components_of_undefined_layers_are_undefined():
    from cka_jax.analysis.pcs import principal_components

    rng = np.random.default_rng(0)
    reps = OrderedDict(
        a=rng.normal(size=(2, 30, 6)).astype(np.float32), b=rng.normal(size=(2, 30, 6)).astype(np.float32)
    )
    reps["b"][1] = 0.0
    pcs = principal_components(reps)
    assert np.isfinite(pcs.variance_fraction[0]).all() and np.isnan(pcs.variance_fraction[1, 1])
    assert np.isfinite(pcs.cka[1, 0, 0]) and np.isnan(pcs.cka[1, 0, 1]) and np.isnan(pcs.cosine[1, 1, 1])


def test_training_curves_of_a_run_whose_every_seed_diverged_are_undefined(tmp_path):
    """Every seed diverged: no seed is left to average, and the means are undefined (this crashed
    with "cannot reshape array of size 0")."""
    import json
    import types

    from cka_jax.analysis import training_curves
    from cka_jax.analysis.context import AnalysisContext
    from cka_jax.workdir import Workdir, metrics_log
    from cka_jax.workdir.config import base_config

    workdir = str(tmp_path)
    rows = [
        {"epoch": 1, "step": 3, "model": m, "train_loss": None, "train_accuracy": None, "diverged": True}
        for m in (0, 1)
    ]
    metrics_log.append(Workdir(workdir).metrics, rows)
    curves = training_curves.read_curves(workdir, 2, 10)
    summary = training_curves.describe(curves)
    assert summary["diverged_seeds"] == [0, 1] and summary["under_trained_seeds"] == []
    assert np.isnan(summary["final_train_loss_mean"]) and np.isnan(summary["final_test_accuracy_mean"])
    population = types.SimpleNamespace(name="run", workdir=workdir, size=2, config=base_config())
    ctx = AnalysisContext([population], types.SimpleNamespace(num_classes=10), str(tmp_path / "out"))
    os.makedirs(ctx.outdir)
    section = training_curves.section(ctx)
    row = section.tables[0].rows[0]
    assert row[3] == row[4] == "undefined (every seed diverged)" and row[5] == "seeds 0, 1"
    record = json.loads(open(ctx.path("training.json")).read(), parse_constant=pytest.fail)[0]
    assert record["final_train_loss_mean"] is None and record["final_test_accuracy"] == [None, None]
    assert "diverged: seeds 0 (epoch 1), 1 (epoch 1)" in section.text
