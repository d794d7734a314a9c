"""Analyses on planted data: block detection, disagreement statistics, probes, CCA padding,
bootstrap intervals, atomic outputs and the report."""
import os
from collections import OrderedDict

import numpy as np
import pytest
from scipy import stats

from cka_jax import report
from cka_jax.analysis import blocks, cca_measures, disagreement, probes
from cka_jax.analysis.bootstrap import bootstrap_mean
from cka_jax.analysis.outputs import Section, Table, write_json, write_npz
from cka_jax.analysis.representations import batch_indices, even_batches
from cka_jax.cca import pwcca, svcca


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


def test_block_detector_prefers_the_longest_block_and_ignores_nan():
    h = planted_heatmap(num_layers=16, start=1, stop=4)
    h[8:14, 8:14] = 0.97
    h[2, 3] = h[3, 2] = np.nan
    found = blocks.detect_block(h, threshold=0.9)
    assert (found.start, found.stop) == (8, 14)
    sizes = blocks.block_sizes(np.stack([h, planted_heatmap(num_layers=16)]), threshold=0.9)
    assert sizes.tolist() == [[8, 14, 6], [5, 10, 5]]


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
    flipped = np.arange(400) < 200          # B finds the first half of the examples hard where A finds them easy
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
    report.save_section(out, Section("within", "Within-model CKA", "First paragraph.\n\nSecond.", ["cka_within.png"],
                                     [Table(["a", "b"], [[1, "<x>"]], "caption")], ["cka_within.npz"]))
    report.write_report(out, "Analysis", "intro", order=["within", "blocks"])
    report.save_section(out, Section("blocks", "Block structure", "text"))
    page = open(report.write_report(out, "Analysis", "intro", order=["within", "blocks"])).read()
    assert page.index("Within-model CKA") < page.index("Block structure")
    assert '<img src="cka_within.png"' in page and 'href="cka_within.pdf"' in page
    assert "&lt;x&gt;" in page and "<p>Second.</p>" in page
