"""analyze.py end to end on tiny trained workdirs, and its errors on bad input: run in this process
(`run_analyze_here`) but for the stop signals, which are sent to a separate analyze.py process."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from in_process import run_analyze_here
from tiny import ROOT

from cka_jax.analysis import runner
from cka_jax.analysis.deletion import deletion_accuracy
from cka_jax.analysis.inputs import AnalysisInputError, load_correct
from cka_jax.analysis.outputs import Section, write_npz
from cka_jax.workdir import Workdir

# Small options for the runs over every analysis (no test reads the numbers they change), the same
# in `analysed` and the undefined-models test so that the programs one compiles serve the other.
FAST_OPTIONS = {"max_examples": 100, "probe_steps": 5, "num_bootstrap": 50}
FAST = [f"--{name}={value}" for name, value in FAST_OPTIONS.items()]
BLOCK_OUTPUTS = ["stem", "stage1/block1/post_residual", "stage2/block1/post_residual", "stage3/block1/post_residual"]


@pytest.fixture(scope="session")
def analysed(workdirs, tmp_path_factory):
    """The output directory of analyze.py over both `workdirs` (narrow, compared with wide), every
    analysis, with FAST options."""
    out = str(tmp_path_factory.mktemp("analysis"))
    result = run_analyze_here(f"--workdir={workdirs[0]}", f"--compare={workdirs[1]}", f"--outdir={out}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_block_sizes_shrink_as_the_threshold_rises(analysed):
    for record in json.load(open(os.path.join(analysed, "blocks.json"))):
        by_threshold = record["block_fraction_by_threshold"]
        fractions = [by_threshold[t] for t in sorted(by_threshold, key=float)]
        assert fractions == sorted(fractions, reverse=True) and len(fractions) == 5
        assert by_threshold["0.85"] == pytest.approx(record["block_fraction_mean"])


@pytest.mark.slow
def test_disagreement_numbers(analysed, workdirs):
    record = json.load(open(os.path.join(analysed, "disagreement.json")))[0]
    assert record["population_b"] == "wide"
    correct, _ = load_correct(workdirs[0])
    assert record["overall"]["mean_a"] == pytest.approx(correct.mean())


@pytest.mark.slow
def test_deleting_nothing_equals_full_accuracy(workdirs):
    ctx = runner.load_context(workdirs[0])
    correct, labels = load_correct(workdirs[0])
    acc = deletion_accuracy(ctx.main, ctx.test, [(), ("stage2/block1",)])
    np.testing.assert_allclose(acc[:, 0], correct.mean(1), atol=1 / len(labels))
    assert acc.shape == (3, 2)


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_analysis_is_an_error_and_writes_nothing(workdirs, tmp_path):
    out = str(tmp_path / "out")
    result = run_analyze_here(f"--workdir={workdirs[0]}", f"--outdir={out}", "--analyses=within,heatmapz")
    assert result.returncode == 2
    assert "unknown analysis name(s) ['heatmapz']" in result.stderr
    assert not os.path.exists(out)


@pytest.mark.slow
def test_missing_default_workdir_says_how_to_train_it(tmp_path):
    result = run_analyze_here(cwd=str(tmp_path))
    assert result.returncode == 2 and "workdir/default" in result.stderr and "train.py" in result.stderr


@pytest.mark.slow
def test_workdir_without_checkpoint_is_an_error(workdirs, tmp_path):
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(workdirs[0], "config.json"), empty / "config.json")
    with pytest.raises(AnalysisInputError, match="no checkpoint"):
        runner.load_context(str(empty))


@pytest.mark.slow
def test_populations_on_different_data_sets_are_refused(workdirs, tmp_path):
    other = tmp_path / "cifar"
    shutil.copytree(workdirs[1], other)
    config = json.load(open(Workdir(str(other)).config))
    config["data.name"] = "cifar10"
    for copy in Workdir(str(other)).config_copies:  # the run keeps both
        if os.path.exists(copy):
            json.dump(config, open(copy, "w"))
    with pytest.raises(AnalysisInputError, match="data.name='digits' but .* data.name='cifar10'"):
        runner.load_context(workdirs[0], [str(other)])


@pytest.mark.slow
def test_populations_with_different_test_sets_are_refused(workdirs, tmp_path):
    other = tmp_path / "relabelled"
    shutil.copytree(workdirs[1], other)
    predictions = Workdir(str(other)).predictions
    with np.load(predictions) as f:
        logits, labels = f["logits"], f["labels"]
    np.savez(predictions, logits=logits[:, :-1], labels=labels[:-1])
    with pytest.raises(AnalysisInputError, match="is not the digits test set"):
        runner.load_context(workdirs[0], [str(other)])


def test_compare_only_analyses_need_compare():
    with pytest.raises(AnalysisInputError, match="--compare"):
        runner.choose_analyses(["disagreement"], has_compare=False)
    assert "disagreement" not in runner.choose_analyses([], has_compare=False)
    assert runner.choose_analyses(["blocks", "within"], has_compare=False) == ["training", "within", "blocks"]


@pytest.mark.slow
def test_the_report_opens_with_the_training_curves(analysed, workdirs):
    page = open(os.path.join(analysed, "report.html")).read()
    assert page.index('id="training"') < page.index('id="within"') < page.index('id="blocks"')
    assert '<img src="training_curves.png"' in page and "under-trained" in page
    records = json.load(open(os.path.join(analysed, "training.json")))
    assert [r["population"] for r in records] == ["narrow", "wide"]
    assert records[0]["epochs"] == 1 and records[0]["diverged_seeds"] == []
    rows = [json.loads(line) for line in open(os.path.join(workdirs[0], "metrics.jsonl"))]
    assert records[0]["final_test_accuracy"] == pytest.approx([r["test_accuracy"] for r in rows if r["epoch"] == 1])


@pytest.mark.slow
@pytest.mark.parametrize("metrics", ["missing", "torn", "diverged"])
def test_training_curves_of_missing_torn_or_diverged_metrics(workdirs, tmp_path, metrics):
    workdir = tmp_path / "narrow"
    shutil.copytree(workdirs[0], workdir)
    path = workdir / "metrics.jsonl"
    if metrics == "missing":
        path.unlink()
    elif metrics == "torn":
        with open(path, "a") as f:
            f.write('{"epoch": 2, "step": 8, "mod')
    else:
        rows = [json.loads(line) for line in open(path)]
        rows[1]["train_loss"] = None
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "out")
    ctx = runner.load_context(str(workdir), outdir=out, images=False)
    runner.run_analyses(ctx, ["training"])
    section = Section.from_json(json.load(open(os.path.join(out, "sections", "training.json"))))
    if metrics == "missing":
        assert "no training metrics" in section.text and section.figures == []
    else:
        assert section.figures == ["training_curves.png"] and os.path.exists(os.path.join(out, "training_curves.png"))
    if metrics == "diverged":
        assert "diverged: seed 1 (epoch 1)" in section.text
        assert json.load(open(os.path.join(out, "training.json")))[0]["diverged_seeds"] == [1]


def with_models(population, change):
    """`population` with its variables changed per model: change(leaf (M, ...)) -> leaf."""
    import dataclasses

    return dataclasses.replace(population, variables=jax.tree.map(change, population.variables))


def nan_model(index):
    return lambda a: a.at[index].set(np.nan) if np.issubdtype(a.dtype, np.floating) else a


@pytest.mark.slow
def test_undefined_models_are_reported_as_undefined_by_every_analysis(workdirs, tmp_path):
    """Main population: seed 1 diverged (NaN parameters). Compared one: seed 1 all zero parameters
    (constant activations). No analysis may turn these into numbers, blocks or 'none found'."""
    from cka_jax.analysis.context import AnalysisOptions

    out = str(tmp_path / "out")
    options = AnalysisOptions(**FAST_OPTIONS)
    ctx = runner.load_context(workdirs[0], [workdirs[1]], outdir=out, options=options)
    ctx.populations[0] = with_models(ctx.populations[0], nan_model(1))
    ctx.populations[1] = with_models(ctx.populations[1], lambda a: a.at[1].set(0) if a.ndim > 1 else a)
    names = [n for n in runner.ANALYSES if n not in ("dynamics", "disagreement")]
    assert runner.run_analyses(ctx, names) == names
    narrow, wide = json.load(open(os.path.join(out, "blocks.json")))
    assert narrow["block_per_model"][1] == [None, None, None]
    assert "non-finite activations in seed 1" in narrow["undefined_reason"]["1"]
    assert "mean over 2 of 3 seeds" in narrow["block_fraction_note"]
    assert wide["block_per_model"][1] == [None, None, None] and wide["block_of_mean_heatmap"] is not None
    assert "constant layer stem in seed 1" in wide["undefined_reason"]["1"]
    for name in ("probes", "deletion"):
        with np.load(os.path.join(out, f"{name}.npz")) as f:
            values = f["accuracy"]
        assert np.isnan(values[1]).all() and np.isfinite(values[[0, 2]]).all(), name
    for name in names:
        section = Section.from_json(json.load(open(os.path.join(out, "sections", f"{name}.json"))))
        cells = [str(c) for t in section.tables for row in t.rows for c in row]
        assert not [c for c in cells if "nan" in c.lower().split()], name
        if name not in ("training", "architectures"):
            assert "seed 1" in section.text and "undefined" in section.text, name
    seeds = Section.from_json(json.load(open(os.path.join(out, "sections", "seeds.json"))))
    assert "mean over 1 of 3 seed pairs" in seeds.text
    matching = Section.from_json(json.load(open(os.path.join(out, "sections", "matching.json"))))
    assert matching.tables[0].rows[0][1] == "undefined (non-finite activations in seed 1)"
    assert (
        "left out as undefined"
        in Section.from_json(json.load(open(os.path.join(out, "sections", "blocks.json")))).tables[0].rows[0][-1]
    )
    for path in glob.glob(os.path.join(out, "**", "*.json"), recursive=True):
        json.loads(open(path).read(), parse_constant=pytest.fail)  # strict JSON: null, never NaN


@pytest.mark.slow
def test_inapplicable_analyses_are_skipped_when_chosen_by_default_and_refused_when_named(workdirs, tmp_path):
    out = str(tmp_path / "out")
    ctx = runner.load_context(workdirs[0], outdir=out)
    ctx.populations[0] = ctx.main.subset(slice(0, 1))
    with pytest.raises(runner.Inapplicable, match="cross-seed CKA needs at least 2 models"):
        runner.check_analyses(ctx, ["seeds"], skip_inapplicable=False)
    assert not os.path.exists(out)
    assert runner.check_analyses(ctx, ["within", "seeds", "matching", "sparse"]) == ["within"]
    assert set(ctx.skipped) == {"seeds", "matching", "sparse"}
    assert "Not run: seeds (cross-seed CKA needs at least 2 models" in runner.report_intro(ctx)


# analyze.py with ARGS, run by a Python process that sends itself signal SIGNAL from WHERE: as
# the first figure starts to be written (the file is then half done), or as the output directory
# is checked (before anything is written).
SIGNALLED_ANALYZE = """
import os, runpy, sys
import matplotlib.figure
import cka_jax.analysis.runner
def signalled(function):
    def call(*args, **kwargs):
        os.kill(os.getpid(), SIGNAL)
        return function(*args, **kwargs)
    return call
if WHERE == "figure":
    matplotlib.figure.Figure.savefig = signalled(matplotlib.figure.Figure.savefig)
else:
    cka_jax.analysis.runner.check_writable_directory = signalled(cka_jax.analysis.runner.check_writable_directory)
sys.argv = ["analyze.py", *ARGS]
runpy.run_path("analyze.py", run_name="__main__")
"""


def analyze_signalled(signum, where, *args):
    script = SIGNALLED_ANALYZE.replace("SIGNAL", str(int(signum))).replace("WHERE", repr(where))
    return subprocess.run(
        [sys.executable, "-c", script.replace("ARGS", repr(list(args)))],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_stop_signal_exits_128_plus_it_with_one_line_and_leaves_no_temporary_file(workdirs, tmp_path, signum):
    out = tmp_path / "out"
    result = analyze_signalled(signum, "figure", f"--workdir={workdirs[0]}", f"--outdir={out}", "--analyses=training")
    lines = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("analyses:")]  # no progress bar
    assert result.returncode == 128 + signum, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"analyze.py: stopped by signal {int(signum)} "), lines
    assert f"the analyses finished before it are in {out}" in lines[0] and "Traceback" not in result.stderr
    written = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert written == ["training.json"], written  # written before the figure; no .tmp-* file


@pytest.mark.slow
def test_a_stop_signal_before_any_output_leaves_no_outdir(workdirs, tmp_path):
    out = tmp_path / "out"
    result = analyze_signalled(signal.SIGTERM, "outdir", f"--workdir={workdirs[0]}", f"--outdir={out}")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "analyze.py: stopped by signal 15 (SIGTERM) while analysing; nothing was written"
    ], result.stderr[-2000:]
    assert not out.exists()
