"""The layer-identification analysis: its one-SVD-per-representation measures against the library's
cca/svcca/pwcca and a NumPy least-squares reference, and the analysis end to end on a tiny run."""

import json
import os

import jax
import numpy as np
import pytest
import tiny

from cka_jax import cca, pwcca, svcca
from cka_jax.analysis import runner
from cka_jax.analysis.context import AnalysisOptions
from cka_jax.analysis.identification_measures import basis, pair_measures, similarity_matrices
from cka_jax.analysis.layer_identification import PAPER
from cka_jax.train import loop as trainer
from cka_jax.workdir import Workdir


def _pair(seed, n=400, p=12, q=9):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p)) @ rng.standard_normal((p, p)) + 3.0
    y = x[:, :q] @ rng.standard_normal((q, q)) + rng.standard_normal((n, q))
    return x, y


def _r2(x, y):
    """Least-squares R² of y on x (with intercept), float64."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    coef, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    return 1 - np.sum((yc - xc @ coef) ** 2) / np.sum(yc**2)


@pytest.mark.parametrize("seed", range(3))
def test_measures_equal_the_library_and_least_squares(seed, x64):
    x, y = _pair(seed)
    got = pair_measures(basis(x), basis(y))
    rho = np.asarray(cca(x, y).rho)
    assert got["cca_rho"][0] == pytest.approx(rho.mean(), rel=1e-8)
    assert got["cca_r2"][0] == pytest.approx(np.mean(rho**2), rel=1e-8)
    assert got["svcca_rho"][0] == pytest.approx(float(svcca(x, y, keep=0.99)), rel=1e-6)
    # the library weights the side with fewer features: y here
    assert got["pwcca"][1] == pytest.approx(float(pwcca(x, y)), rel=1e-6)
    weights = np.asarray(cca(x, y).x_weights)
    assert got["pwcca"][0] == pytest.approx(float(np.sum(weights * rho) / weights.sum()), rel=1e-6)
    assert got["linear_regression"] == pytest.approx((_r2(x, y), _r2(y, x)), rel=1e-8)


def test_similarity_matrices_are_symmetrised_and_undefined_sides_are_nan():
    rng = np.random.default_rng(5)
    reps = [[rng.standard_normal((200, 6)) for _ in range(3)] for _ in range(2)]
    bases = [[basis(x) for x in model] for model in reps]
    bases[1][2] = basis(np.ones((200, 6)))
    assert bases[1][2] is None
    sims = similarity_matrices(bases)
    for s in sims.values():
        np.testing.assert_allclose(s, np.transpose(s, (1, 0, 3, 2)))
        assert np.isnan(s[0, 0]).all() and np.isnan(s[0, 1, :, 2]).all() and np.isfinite(s[0, 1, :, :2]).all()
    forward, backward = pair_measures(bases[0][0], bases[1][1])["pwcca"]
    assert sims["pwcca"][0, 1, 0, 1] == pytest.approx(forward + backward)


@pytest.mark.slow
def test_analysis_end_to_end(tmp_path):
    """3 ResNet-8 on digits: every measure's accuracy in [0, 1], the JSON's fields, the report table."""
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(tiny.tiny_config(3, 2), workdir, devices=jax.devices()[:1])
    assert os.path.exists(Workdir(workdir).predictions)
    options = AnalysisOptions(batch_size=64, probe_examples=600)
    ctx = runner.load_context(workdir, outdir=str(tmp_path / "analysis"), options=options)
    runner.run_analyses(ctx, ["layer_identification"])
    out = json.load(open(tmp_path / "analysis" / "layer_identification.json"))
    assert set(out["measures"]) == set(PAPER)
    assert all(0 <= v <= 1 for v in out["measures"].values())
    assert out["num_models"] == 3 and out["num_examples"] == 576
    assert out["layers"][0] == "stem" and out["layers"][-1] == "pool"
    assert all(1 <= v <= 576 // 20 for v in out["cca_features"].values())
    assert out["num_trials"] == 3 * 2 * 5 and not any(out["undefined"].values())
    page = open(tmp_path / "analysis" / "report.html").read()
    assert "Layer identification" in page and "99.3" in page
