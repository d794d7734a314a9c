"""Analyses on planted data: block detection, disagreement statistics, probes, CCA padding,
bootstrap intervals, atomic outputs and the report."""

import os
from collections import OrderedDict

import numpy as np
import pytest
from scipy import stats

from cka_jax import pwcca, svcca
from cka_jax.analysis import blocks, cca_measures, disagreement, probes, report
from cka_jax.analysis.bootstrap import bootstrap_mean
from cka_jax.analysis.outputs import Section, Table, write_json, write_npz
from cka_jax.analysis.representations import batch_indices, even_batches


def planted_heatmap(num_layers=12, start=5, stop=10, inside=0.95, seed=0):
    """Neighbouring layers similar (decaying with distance), a block [start, stop) of high CKA."""
    rng = np.random.default_rng(seed)
    i = np.arange(num_layers)
    h = 0.8 ** np.abs(i[:, None] - i[None, :])
    h[start:stop, start:stop] = inside + 0.03 * rng.random((stop - start, stop - start))
    h = np.minimum((h + h.T) / 2, 1.0)
    np.fill_diagonal(h, 1.0)
    return h


def test_block_detector_finds_the_planted_block():
    found = blocks.detect_block(planted_heatmap(start=5, stop=10), threshold=0.9)
    assert (found.start, found.stop, found.size) == (5, 10, 5)
    assert found.mean_cka > 0.9


def test_block_detector_reports_no_block_without_one():
    i = np.arange(10)
    assert blocks.detect_block(0.7 ** np.abs(i[:, None] - i[None, :]), threshold=0.9) == blocks.NO_BLOCK


def test_block_detector_prefers_the_longest_block():
    h = planted_heatmap(num_layers=16, start=1, stop=4)
    h[8:14, 8:14] = 0.97
    found = blocks.detect_block(h, threshold=0.9)
    assert (found.start, found.stop) == (8, 14)
    sizes = blocks.block_sizes(np.stack([h, planted_heatmap(num_layers=16)]), threshold=0.9)
    assert sizes.tolist() == [[8, 14, 6], [5, 10, 5]]


@pytest.mark.parametrize(
    "cell, value",
    [((2, 3), np.nan), ((9, 10), np.nan), ((0, 15), np.inf), ((7, 7), np.nan)],
    ids=["nan-outside-block", "nan-inside-block", "inf-corner", "nan-diagonal"],
)
def test_a_heatmap_with_an_undefined_cell_has_an_undefined_block(cell, value):
    h = planted_heatmap(num_layers=16)
    h[cell] = h[cell[::-1]] = value
    found = blocks.detect_block(h, threshold=0.9)
    assert not found.defined and np.isnan(found.size) and found.describe(16) == "block: undefined"
    assert found != blocks.NO_BLOCK
    assert blocks.blocks_in_structure(("stem",) * 16, found) == ()
    sizes = blocks.block_sizes(np.stack([h, planted_heatmap(num_layers=16)]), threshold=0.9)
    assert np.isnan(sizes[0]).all() and sizes[1].tolist() == [5, 10, 5]


def test_block_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        blocks.detect_block(np.zeros((3, 4)))


def test_blocks_in_structure_names_residual_blocks():
    names = ("stem", "stage1/block1/post_residual", "stage1/block2/post_residual", "stage2/block1/post_residual")
    assert blocks.blocks_in_structure(names, blocks.BlockStructure(2, 4, 0.95)) == ("stage1/block2", "stage2/block1")
    assert blocks.blocks_in_structure(names, blocks.NO_BLOCK) == ()


def planted_class_accuracies(num_models=20, num_classes=10, differing=(3,), shift=0.2, seed=0):
    rng = np.random.default_rng(seed)
    a = np.clip(0.7 + 0.05 * rng.standard_normal((num_models, num_classes)), 0, 1)
    b = np.clip(0.7 + 0.05 * rng.standard_normal((num_models, num_classes)), 0, 1)
    b[:, list(differing)] -= shift
    return a, b


def test_per_class_tests_match_scipy_and_find_the_planted_class():
    a, b = planted_class_accuracies()
    tests = disagreement.per_class_tests(a, b, alpha=0.01)
    t, p = stats.ttest_ind(a, b, axis=0, equal_var=False)
    np.testing.assert_allclose(tests.t, t)
    np.testing.assert_allclose(tests.p_value, p)
    assert np.flatnonzero(tests.significant).tolist() == [3]
    assert tests.difference[3] == pytest.approx(0.2, abs=0.05)


def test_fdr_correction_removes_false_positives():
    a, b = planted_class_accuracies(num_classes=400, differing=range(5), shift=0.15, seed=1)
    raw = disagreement.per_class_tests(a, b, alpha=0.05)
    corrected = disagreement.per_class_tests(a, b, alpha=0.05, fdr=True)
    false_raw, false_corrected = raw.significant[5:].sum(), corrected.significant[5:].sum()
    assert false_raw >= 5 and false_corrected < false_raw
    assert corrected.significant[:5].all()
    np.testing.assert_allclose(corrected.p_adjusted, stats.false_discovery_control(raw.p_value))


def test_per_class_tests_leave_constant_classes_undecided():
    a, b = planted_class_accuracies(num_classes=4)
    a[:, 0] = b[:, 0] = 1.0
    assert not disagreement.per_class_tests(a, b, fdr=True).significant[0]


def test_per_example_statistics():
    logits = np.zeros((4, 3, 2))
    logits[:, :, 1] = [[1, 1, -1], [1, -1, -1], [1, 1, 1], [1, -1, 1]]
    correct = logits.argmax(-1) == np.array([1, 1, 0])
    np.testing.assert_allclose(disagreement.per_example_accuracy(correct), [1.0, 0.5, 0.5])
    acc = disagreement.per_class_accuracy(correct, np.array([1, 1, 0]), 3)
    np.testing.assert_allclose(acc[:, 0], [1, 1, 0, 0])
    assert np.isnan(acc[:, 2]).all()
    h1, h2 = disagreement.disjoint_groups(5, 2, seed=3)
    assert len(h1) == len(h2) == 2 and not set(h1) & set(h2)
    with pytest.raises(ValueError, match="1 <= size <= 2"):
        disagreement.disjoint_groups(5, 3)


def test_per_example_panels_use_equal_groups_and_find_the_planted_difference():
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.05, 0.95, 400)
    flipped = np.arange(400) < 200  # B finds the first half of the examples hard where A finds them easy
    correct_a = rng.random((40, 400)) < difficulty
    correct_b = rng.random((10, 400)) < np.where(flipped, 1 - difficulty, difficulty)
    k, panels = disagreement.per_example_panels(correct_a, correct_b, seed=1)
    assert k == 5
    assert [(gx, gy) for _, _, gx, gy in panels] == [("A1", "B1"), ("A1", "A2"), ("B1", "B2")]
    assert all(len(x) == 400 and np.all(x * 5 == np.round(x * 5)) for x, _, _, _ in panels)  # groups of 5 models
    r = [disagreement.correlation(x, y) for x, y, _, _ in panels]
    assert r[0] < 0.3 and min(r[1], r[2]) > 0.5
    assert np.isnan(disagreement.correlation(np.ones(3), np.arange(3.0)))


def test_overall_test_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = 0.78 + 0.01 * rng.standard_normal(30), 0.775 + 0.01 * rng.standard_normal(25)
    result = disagreement.overall_test(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert result.t == pytest.approx(reference.statistic) and result.p_value == pytest.approx(reference.pvalue)
    assert result.dof == pytest.approx(reference.df)
    assert result.sem_a == pytest.approx(stats.sem(a))


def test_probes_reach_high_accuracy_on_separable_features():
    rng = np.random.default_rng(0)
    centres = 4 * rng.standard_normal((5, 12))

    def sample(n):
        labels = rng.integers(0, 5, n)
        return centres[labels] + rng.standard_normal((n, 12)), labels

    (train_x, train_y), (test_x, test_y) = sample(400), sample(200)
    noise = rng.standard_normal((400, 12))
    acc = probes.probe_accuracy(np.stack([train_x, noise]), train_y, np.stack([test_x, test_x]), test_y, 5, steps=200)
    assert acc[0] > 0.95 and acc[1] < 0.5


def test_padded_cca_heatmaps_equal_unpadded_measures():
    rng = np.random.default_rng(0)
    reps = OrderedDict(a=rng.normal(size=(2, 300, 8)), b=rng.normal(size=(2, 300, 16)), c=rng.normal(size=(2, 300, 4)))
    reps["b"][..., :4] += 3 * reps["c"]
    reps = OrderedDict((k, v.astype(np.float32)) for k, v in reps.items())
    names = list(reps)
    for measure, fn in (("pwcca", pwcca), ("svcca", lambda x, y: svcca(x, y, keep=0.99))):
        heatmaps = cca_measures.within_heatmaps(measure, reps)
        reference = [[[float(fn(reps[x][m], reps[y][m])) for y in names] for x in names] for m in range(2)]
        np.testing.assert_allclose(heatmaps, reference, atol=1e-5)
    assert cca_measures.cross_seed_same_layer("cka", reps).shape == (1, 3)


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).normal(0.5, 0.1, size=(40, 3))
    mean, low, high = bootstrap_mean(values, 500, 0.95)
    assert (low < mean).all() and (mean < high).all()
    np.testing.assert_allclose(mean, values.mean(0))
    assert bootstrap_mean(np.array([[0.3]]))[1:] == (pytest.approx(0.3), pytest.approx(0.3))


def test_even_minibatches():
    assert even_batches(360, 256) == 180 and even_batches(10000, 256) == 250
    batches = batch_indices(10, 4, passes=2, seed=0)
    assert [len(b) for b in batches] == [3] * 6
    assert sorted(np.concatenate(batches[:3]).tolist()) == list(range(9))


def test_outputs_are_atomic(tmp_path):
    path = str(tmp_path / "numbers.npz")
    write_npz(path, x=np.arange(3))

    class Unwritable:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_npz(path, x=np.arange(5), y=Unwritable())
    np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))
    assert os.listdir(tmp_path) == ["numbers.npz"]
    with pytest.raises(TypeError):
        write_json(str(tmp_path / "x.json"), {"a": object()})
    assert not (tmp_path / "x.json").exists()


def test_report_keeps_sections_of_earlier_runs(tmp_path):
    out = str(tmp_path)
    report.save_section(
        out,
        Section(
            "within",
            "Within-model CKA",
            "First paragraph.\n\nSecond.",
            ["cka_within.png"],
            [Table(["a", "b"], [[1, "<x>"]], "caption")],
            ["cka_within.npz"],
        ),
    )
    report.write_report(out, "Analysis", "intro", order=["within", "blocks"])
    report.save_section(out, Section("blocks", "Block structure", "text"))
    page = open(report.write_report(out, "Analysis", "intro", order=["within", "blocks"])).read()
    assert page.index("Within-model CKA") < page.index("Block structure")
    assert '<img src="cka_within.png"' in page and 'href="cka_within.pdf"' in page
    assert "&lt;x&gt;" in page and "<p>Second.</p>" in page


BAD_OPTIONS = [
    ("passes", 0),
    ("passes", -1),
    ("batch_size", -5),
    ("batch_size", 0),
    ("batch_size", 3),
    ("batch_size", 4.5),
    ("max_models", 0),
    ("max_examples", 0),
    ("max_examples", 3),
    ("block_threshold", 0.0),
    ("block_threshold", 1.5),
    ("block_threshold", float("nan")),
    ("block_threshold", float("inf")),
    ("alpha", 0.0),
    ("alpha", 1.0),
    ("alpha", float("nan")),
    ("num_bootstrap", 0),
    ("num_bootstrap", 10**9),
    ("probe_steps", 0),
    ("level", 1.0),
    ("seed", -1),
    ("fdr", "yes"),
    ("passes", True),
    ("block_min_layers", 1),
]


@pytest.mark.parametrize("name, value", BAD_OPTIONS, ids=[f"{n}={v}" for n, v in BAD_OPTIONS])
def test_analysis_options_are_validated_up_front(name, value):
    from cka_jax.analysis.context import AnalysisOptions

    with pytest.raises(ValueError, match=f"^{name}="):
        AnalysisOptions(**{name: value})


def test_analysis_options_accept_the_edges():
    from cka_jax.analysis.context import AnalysisOptions

    AnalysisOptions(
        batch_size=4,
        passes=1,
        max_examples=4,
        max_models=1,
        block_threshold=1.0,
        alpha=0.5,
        num_bootstrap=1,
        probe_steps=1,
        seed=0,
    )


def metrics_rows(num_models=4, epochs=6, diverged=(), weak=(), eval_every=2):
    """Planted metrics.jsonl rows: models learn to ~0.95; `weak` ones stay near 0.3; `diverged` ones
    get null losses from epoch 4 on."""
    rows = []
    for epoch in range(1, epochs + 1):
        for m in range(num_models):
            accuracy = 0.3 if m in weak else 0.95 - 0.5 / epoch
            row = {
                "epoch": epoch,
                "step": 10 * epoch,
                "model": m,
                "train_loss": 2.0 / epoch,
                "train_accuracy": accuracy,
                "learning_rate": 0.1,
                "images_per_second": 100.0,
            }
            if m in diverged and epoch >= 4:
                row["train_loss"] = row["train_accuracy"] = None
            if epoch % eval_every == 0:
                row["test_accuracy"] = None if m in diverged and epoch >= 4 else accuracy - 0.02
            rows.append(row)
    return rows


def test_training_curves_mark_diverged_and_under_trained_seeds():
    from cka_jax.analysis import training_curves

    curves = training_curves.curves_from_rows(metrics_rows(diverged=(1,), weak=(3,)), 4, 10)
    assert curves.diverged.tolist() == [False, True, False, False] and curves.diverged_at[1] == 4
    assert curves.under_trained().tolist() == [False, False, False, True]
    assert np.isnan(curves.test_accuracy[0, 0]) and curves.test_accuracy[0, 1] == pytest.approx(0.68)
    summary = training_curves.describe(curves)
    assert summary["diverged_seeds"] == [1] and summary["under_trained_seeds"] == [3]
    assert np.isnan(summary["final_test_accuracy"][1])
    final = 0.95 - 0.5 / 6 - 0.02
    assert summary["final_test_accuracy_mean"] == pytest.approx(np.mean([final, final, 0.28]))
    assert training_curves.marked_seeds(curves) == "diverged: seed 1 (epoch 4); under-trained: seed 3"


def test_training_curves_mark_a_seed_whose_loss_exploded_as_diverged():
    """Training marks a finite but exploded loss `"diverged": true`: the curves must not read it as
    a trained seed."""
    from cka_jax.analysis import training_curves

    rows = metrics_rows(num_models=3, epochs=4)
    rows.append(
        {
            "epoch": 5,
            "step": 47,
            "model": 2,
            "train_loss": 1.7e15,
            "train_accuracy": 0.1,
            "learning_rate": 0.1,
            "images_per_second": None,
            "diverged": True,
        }
    )
    curves = training_curves.curves_from_rows(rows, 3, 10)
    assert curves.diverged.tolist() == [False, False, True] and curves.diverged_at[2] == 5
    assert np.isnan(curves.final("test_accuracy")[2])
    assert training_curves.describe(curves)["diverged_seeds"] == [2]


def test_training_curves_read_through_metrics_log_with_a_torn_last_line(tmp_path):
    from cka_jax.analysis import training_curves
    from cka_jax.workdir import Workdir, metrics_log

    path = Workdir(str(tmp_path)).metrics
    metrics_log.append(path, metrics_rows(num_models=2, epochs=3))
    with open(path, "a") as f:
        f.write('{"epoch": 4, "step": 40, "model": 0, "train_lo')
    curves = training_curves.read_curves(str(tmp_path), 2, 10)
    assert curves.epochs.tolist() == [1, 2, 3] and not curves.diverged.any()
    assert training_curves.read_curves(str(tmp_path / "none"), 2, 10) is None


def test_report_says_when_a_population_is_not_a_finished_run(tmp_path):
    """A workdir whose training diverged or has not finished is analysed at its last checkpoint; the
    report must say so instead of presenting that checkpoint as the trained population."""
    import types

    from cka_jax.analysis import runner
    from cka_jax.workdir import Workdir, metrics_log

    population = types.SimpleNamespace(workdir=str(tmp_path), step=8)
    assert "has not finished" in runner.training_status(population)
    metrics_log.append(
        Workdir(str(tmp_path)).metrics,
        [{"epoch": 1, "step": 8, "model": m, "train_loss": None, "diverged": True} for m in (0, 1)],
    )
    status = runner.training_status(population)
    assert "DIVERGED (models 0, 1)" in status and "step 8" in status
    predictions = Workdir(str(tmp_path)).predictions
    os.makedirs(os.path.dirname(predictions))
    open(predictions, "wb").close()
    assert runner.training_status(population) == ""
