"""analyze.py end to end on tiny trained workdirs, and its errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cka_jax import trainer
from cka_jax.analysis import runner
from cka_jax.analysis.deletion import deletion_accuracy
from cka_jax.analysis.outputs import Section, write_npz
from cka_jax.analysis.workdir import AnalysisInputError, load_correct
from cka_jax.run_config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--max_examples=200", "--probe_steps=50", "--num_bootstrap=100"]
BLOCK_OUTPUTS = ["stem", "stage1/block1/post_residual", "stage2/block1/post_residual", "stage3/block1/post_residual"]


def tiny_config(size: int, width: float):
    c = base_config()
    c.data.fraction, c.data.crop_padding, c.data.flip = 0.1, 1, False
    c.model.depth, c.model.width = 8, width
    c.population.size, c.population.strategy = size, "loop"
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 1, 32, 180
    c.checkpoint.keep_at_fractions = (0.0, 0.5, 1.0)
    return c


@pytest.fixture(scope="session")
def workdirs(tmp_path_factory):
    """Two trained tiny digits populations: 3 × ResNet-8 (0.25×) and 2 × ResNet-8 (0.5×)."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for name, size, width in (("narrow", 3, 0.25), ("wide", 2, 0.5)):
        path = str(root / name)
        trainer.train_and_evaluate(tiny_config(size, width), path, devices=jax.devices()[:1])
        paths.append(path)
    return paths


def analyze(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "analyze.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def analysed(workdirs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("analysis"))
    result = analyze(f"--workdir={workdirs[0]}", f"--compare={workdirs[1]}", f"--outdir={out}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_analysis_writes_numbers_figures_and_a_report_section(analysed):
    page = open(os.path.join(analysed, "report.html")).read()
    for name in runner.ANALYSES:
        section = Section.from_json(json.load(open(os.path.join(analysed, "sections", f"{name}.json"))))
        assert f'id="{name}"' in page
        for path in section.figures + section.numbers:
            assert os.path.exists(os.path.join(analysed, path)), path
        for figure in section.figures:
            assert os.path.exists(os.path.join(analysed, figure.replace(".png", ".pdf")))
    assert not [f for f in os.listdir(analysed) if f.startswith(".tmp")]


def test_cka_within_holds_block_output_heatmaps(analysed):
    with np.load(os.path.join(analysed, "cka_within.npz")) as f:
        cka, names = f["cka"], f["layer_names"]
    assert cka.shape == (3, 4, 4) and names.tolist() == BLOCK_OUTPUTS
    np.testing.assert_allclose(np.diagonal(cka, axis1=1, axis2=2), 1.0, atol=1e-4)
    np.testing.assert_allclose(cka, np.swapaxes(cka, 1, 2), atol=1e-5)
    with np.load(os.path.join(analysed, "cka_within_all.npz")) as f:
        full, all_names = f["cka"], f["layer_names"].tolist()
    index = [all_names.index(n) for n in BLOCK_OUTPUTS]
    np.testing.assert_allclose(full[:, index][:, :, index], cka)


def test_block_sizes_shrink_as_the_threshold_rises(analysed):
    for record in json.load(open(os.path.join(analysed, "blocks.json"))):
        by_threshold = record["block_fraction_by_threshold"]
        fractions = [by_threshold[t] for t in sorted(by_threshold, key=float)]
        assert fractions == sorted(fractions, reverse=True) and len(fractions) == 5
        assert by_threshold["0.85"] == pytest.approx(record["block_fraction_mean"])


def test_disagreement_numbers(analysed, workdirs):
    record = json.load(open(os.path.join(analysed, "disagreement.json")))[0]
    assert record["population_b"] == "wide"
    correct, _ = load_correct(workdirs[0])
    assert record["overall"]["mean_a"] == pytest.approx(correct.mean())


def test_deleting_nothing_equals_full_accuracy(workdirs):
    ctx = runner.load_context(workdirs[0])
    correct, labels = load_correct(workdirs[0])
    acc = deletion_accuracy(ctx.main, ctx.test, [(), ("stage2/block1",)])
    np.testing.assert_allclose(acc[:, 0], correct.mean(1), atol=1 / len(labels))
    assert acc.shape == (3, 2)


def test_a_failed_analysis_keeps_earlier_outputs(workdirs, tmp_path, monkeypatch):
    out = str(tmp_path / "analysis")
    ctx = runner.load_context(workdirs[0], outdir=out)

    def writes_numbers(name):
        def run(ctx):
            write_npz(ctx.path("numbers.npz"), x=np.arange(3))
            return Section(name, name.title(), "text", numbers=["numbers.npz"])
        return run

    def broken(ctx):
        write_npz(ctx.path("numbers.npz"), x=np.zeros(0), bad=BrokenArray())
        raise AssertionError("unreachable")

    monkeypatch.setitem(runner.ANALYSES, "within", runner.Analysis("within", writes_numbers("within")))
    monkeypatch.setitem(runner.ANALYSES, "blocks", runner.Analysis("blocks", writes_numbers("blocks")))
    runner.run_analyses(ctx, ["within"])
    monkeypatch.setitem(runner.ANALYSES, "within", runner.Analysis("within", broken))
    with pytest.raises(runner.AnalysesFailed, match=r"\['within'\]"):
        runner.run_analyses(ctx, ["within", "blocks"])
    np.testing.assert_array_equal(np.load(os.path.join(out, "numbers.npz"))["x"], np.arange(3))
    page = open(os.path.join(out, "report.html")).read()
    assert 'id="within"' in page and 'id="blocks"' in page


class BrokenArray:
    def __array__(self, *args, **kwargs):
        raise RuntimeError("planted failure while writing")


def test_unknown_analysis_is_an_error_and_writes_nothing(workdirs, tmp_path):
    out = str(tmp_path / "out")
    result = analyze(f"--workdir={workdirs[0]}", f"--outdir={out}", "--analyses=within,heatmapz")
    assert result.returncode == 2
    assert "unknown analysis name(s) ['heatmapz']" in result.stderr
    assert not os.path.exists(out)


def test_missing_default_workdir_says_how_to_train_it(tmp_path):
    result = analyze(cwd=str(tmp_path))
    assert result.returncode == 2 and "workdir/default" in result.stderr and "train.py" in result.stderr


def test_workdir_without_checkpoint_is_an_error(workdirs, tmp_path):
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(workdirs[0], "config.json"), empty / "config.json")
    with pytest.raises(AnalysisInputError, match="no checkpoint"):
        runner.load_context(str(empty))


def test_populations_on_different_data_sets_are_refused(workdirs, tmp_path):
    other = tmp_path / "cifar"
    shutil.copytree(workdirs[1], other)
    config = json.load(open(other / "config.json"))
    config["data.name"] = "cifar10"
    json.dump(config, open(other / "config.json", "w"))
    with pytest.raises(AnalysisInputError, match="data.name='digits' but .* data.name='cifar10'"):
        runner.load_context(workdirs[0], [str(other)])


def test_populations_with_different_test_sets_are_refused(workdirs, tmp_path):
    other = tmp_path / "relabelled"
    shutil.copytree(workdirs[1], other)
    with np.load(other / "predictions" / "test.npz") as f:
        logits, labels = f["logits"], f["labels"]
    np.savez(other / "predictions" / "test.npz", logits=logits[:, :-1], labels=labels[:-1])
    with pytest.raises(AnalysisInputError, match="is not the digits test set"):
        runner.load_context(workdirs[0], [str(other)])


def test_compare_only_analyses_need_compare():
    with pytest.raises(AnalysisInputError, match="--compare"):
        runner.choose_analyses(["disagreement"], has_compare=False)
    assert "disagreement" not in runner.choose_analyses([], has_compare=False)
    assert runner.choose_analyses(["blocks", "within"], has_compare=False) == ["within", "blocks"]
