"""analyze.py refuses bad input with one line naming it, exit status 2, no traceback, and nothing
written: flags, workdirs, configs, predictions and output directories, one row each, run in this
process (`run_analyze_here`); one row again as a separate process, the real command line end to end."""

import os
import shutil

import numpy as np
import pytest
from in_process import run_analyze_here
from tiny import analyze

from cka_jax.workdir import Workdir


def damaged_config(text):
    def damage(workdir):
        for copy in Workdir(workdir).config_copies:
            if os.path.exists(copy):
                with open(copy, "w") as f:
                    f.write(text)

    return damage


def empty_predictions(workdir):
    open(Workdir(workdir).predictions, "wb").close()


def without_checkpoints(workdir):
    checkpoints = Workdir(workdir).checkpoints
    for name in os.listdir(checkpoints):
        if name.isdigit():
            shutil.rmtree(os.path.join(checkpoints, name))


def changed_predictions(change):
    def damage(workdir):
        path = Workdir(workdir).predictions
        with np.load(path) as f:
            logits, labels = f["logits"].copy(), f["labels"].copy()
        np.savez(path, **dict(zip(("logits", "labels"), change(logits, labels), strict=True)))

    return damage


def _nan(logits, labels):
    logits[1, 3, 2] = np.nan
    return logits, labels


def bad_flags(*flags, says=None):
    """A row for flags that are bad on intact workdirs: the line names the first flag (or `says`)."""
    return list(flags), None, says or flags[0]


def bad_compared_predictions(change, says):
    """A row for predictions/test.npz of the compared workdir changed by `change`, read by the
    disagreement analysis."""
    return ["--analyses=disagreement"], ("compare", changed_predictions(change)), says


# id: (flags (the main workdir, the outdir and the compared workdir are filled in), what to do to
# a copy of the main or compared workdir, text the one stderr line must hold)
ROWS = {
    "passes=0": bad_flags("--passes=0"),
    "passes=abc": bad_flags("--passes=abc"),
    "batch_size=-5": bad_flags("--batch_size=-5"),
    "batch_size=0": bad_flags("--batch_size=0"),
    "batch_size=3": bad_flags("--batch_size=3"),
    "max_models=0": bad_flags("--max_models=0"),
    "max_models=1-seeds": bad_flags("--max_models=1", "--analyses=seeds"),
    "max_examples=0": bad_flags("--max_examples=0"),
    "max_examples=10-cca": bad_flags("--max_examples=10", "--analyses=cca"),
    "block_threshold=0": bad_flags("--block_threshold=0", says="--block_threshold=0.0"),
    "block_threshold=1.5": bad_flags("--block_threshold=1.5"),
    "block_threshold=nan": bad_flags("--block_threshold=nan"),
    "alpha=0": bad_flags("--alpha=0", says="--alpha=0.0"),
    "alpha=1": bad_flags("--alpha=1", says="--alpha=1.0"),
    "alpha=inf": bad_flags("--alpha=inf"),
    "num_bootstrap=0": bad_flags("--num_bootstrap=0"),
    "probe_steps=0": bad_flags("--probe_steps=0"),
    "seed=-1": bad_flags("--seed=-1"),
    "analyses=bogus": bad_flags("--analyses=bogus", says="['bogus']"),
    "workdir-is-a-file": bad_flags("--workdir={file}", says="is a file, not a directory"),
    "workdir-missing": bad_flags("--workdir={missing}", says="does not exist"),
    "workdir-without-checkpoints": ([], ("main", without_checkpoints), "has no checkpoint"),
    "config-unparseable": ([], ("main", damaged_config("{not json")), "config.json"),
    "config-not-an-object": ([], ("main", damaged_config("[1, 2]")), "config.json"),
    "config-unknown-field": ([], ("main", damaged_config('{"model.colour": "red"}')), "model.colour"),
    "predictions-0-bytes": ([], ("main", empty_predictions), "test.npz cannot be read"),
    "outdir-below-a-file": bad_flags("--outdir={file}/analysis", says="--outdir"),
    "outdir-in-proc": bad_flags("--outdir=/proc/self/no_such/analysis", says="--outdir"),
    "compare-symlink-to-workdir": bad_flags("--compare={link}", says="is the same directory as --workdir"),
    "compare-relative-path-to-workdir": bad_flags("--compare={main}/../narrow", says="is the same directory as"),
    "compare-nan-logits": bad_compared_predictions(_nan, "not all finite"),
    "compare-5-classes": bad_compared_predictions(
        lambda g, y: (g[..., :5], y), "logits over 5 classes, but the data set has 10"
    ),
    "compare-labels-out-of-range": bad_compared_predictions(lambda g, y: (g, y + 10), "outside the 10 classes"),
    "compare-integer-logits": bad_compared_predictions(lambda g, y: (g.astype(np.int64), y), "logits of dtype int64"),
}


# The row also run as a separate process: it restores the checkpoints and loads the test set
# before refusing, so the most of a real run's start (imports, orbax, data loading) must print
# nothing beside the one line, including what libraries write to file descriptor 2 themselves.
SEPARATE_PROCESS_ROW = "max_examples=10-cca"


def check_bad_input(row, workdirs, tmp_path, run):
    """Runs analyze.py with `run` (in this process or another) on copies of `workdirs` damaged as
    ROWS[row] says, and checks the one line, the exit status 2 and that nothing was written."""
    flags, damage, expected = ROWS[row]
    main, compare = str(tmp_path / "narrow"), str(tmp_path / "wide")
    shutil.copytree(workdirs[0], main)
    shutil.copytree(workdirs[1], compare)
    if damage is not None:
        damage[1](main if damage[0] == "main" else compare)
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a directory")
    out = tmp_path / "out"
    (tmp_path / "link").symlink_to(main)
    names = {"file": str(regular_file), "missing": str(tmp_path / "missing"), "link": str(tmp_path / "link")}
    names["main"] = main
    args = [f"--workdir={main}", f"--outdir={out}"]
    if "--analyses=disagreement" in flags:
        args.append(f"--compare={compare}")
    args += [f.format(**names) for f in flags]
    before = {p: sorted(os.listdir(p)) for p in (main, compare)}
    result = run(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("analyze.py: error: "), result.stderr[-2000:]
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not out.exists() and regular_file.read_text() == "not a directory"
    assert {p: sorted(os.listdir(p)) for p in (main, compare)} == before


@pytest.mark.slow
@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(row, workdirs, tmp_path):
    check_bad_input(row, workdirs, tmp_path, run_analyze_here)


@pytest.mark.slow
def test_bad_input_in_a_separate_process_is_one_line_exit_2_and_writes_nothing(workdirs, tmp_path):
    check_bad_input(SEPARATE_PROCESS_ROW, workdirs, tmp_path, analyze)
