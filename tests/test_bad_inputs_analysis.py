"""analyze.py refuses bad input with one line naming it, exit status 2, no traceback, and nothing
written: flags, workdirs, configs, predictions and output directories, one row each."""
import os
import shutil

import numpy as np
import pytest

from test_analyze_cli import analyze, workdirs  # noqa: F401  (the session's trained tiny populations)


def damaged_config(text):
    def damage(workdir):
        for copy in ("config.json", os.path.join("checkpoints", "config.json")):
            if os.path.exists(os.path.join(workdir, copy)):
                with open(os.path.join(workdir, copy), "w") as f:
                    f.write(text)
    return damage


def empty_predictions(workdir):
    open(os.path.join(workdir, "predictions", "test.npz"), "wb").close()


def without_checkpoints(workdir):
    for name in os.listdir(os.path.join(workdir, "checkpoints")):
        if name.isdigit():
            shutil.rmtree(os.path.join(workdir, "checkpoints", name))


def changed_predictions(change):
    def damage(workdir):
        path = os.path.join(workdir, "predictions", "test.npz")
        with np.load(path) as f:
            logits, labels = f["logits"].copy(), f["labels"].copy()
        np.savez(path, **dict(zip(("logits", "labels"), change(logits, labels))))
    return damage


def _nan(logits, labels):
    logits[1, 3, 2] = np.nan
    return logits, labels


# id: (flags (the main workdir, the outdir and the compared workdir are filled in), what to do to
# a copy of the main or compared workdir, text the one stderr line must hold)
ROWS = {
    "passes=0": (["--passes=0"], None, "--passes=0"),
    "passes=abc": (["--passes=abc"], None, "--passes=abc"),
    "batch_size=-5": (["--batch_size=-5"], None, "--batch_size=-5"),
    "batch_size=0": (["--batch_size=0"], None, "--batch_size=0"),
    "batch_size=3": (["--batch_size=3"], None, "--batch_size=3"),
    "max_models=0": (["--max_models=0"], None, "--max_models=0"),
    "max_models=1-seeds": (["--max_models=1", "--analyses=seeds"], None, "--max_models=1"),
    "max_examples=0": (["--max_examples=0"], None, "--max_examples=0"),
    "max_examples=10-cca": (["--max_examples=10", "--analyses=cca"], None, "--max_examples=10"),
    "block_threshold=0": (["--block_threshold=0"], None, "--block_threshold=0.0"),
    "block_threshold=1.5": (["--block_threshold=1.5"], None, "--block_threshold=1.5"),
    "block_threshold=nan": (["--block_threshold=nan"], None, "--block_threshold=nan"),
    "alpha=0": (["--alpha=0"], None, "--alpha=0.0"),
    "alpha=1": (["--alpha=1"], None, "--alpha=1.0"),
    "alpha=inf": (["--alpha=inf"], None, "--alpha=inf"),
    "num_bootstrap=0": (["--num_bootstrap=0"], None, "--num_bootstrap=0"),
    "probe_steps=0": (["--probe_steps=0"], None, "--probe_steps=0"),
    "seed=-1": (["--seed=-1"], None, "--seed=-1"),
    "analyses=bogus": (["--analyses=bogus"], None, "['bogus']"),
    "workdir-is-a-file": (["--workdir={file}"], None, "is a file, not a directory"),
    "workdir-missing": (["--workdir={missing}"], None, "does not exist"),
    "workdir-without-checkpoints": ([], ("main", without_checkpoints), "has no checkpoint"),
    "config-unparseable": ([], ("main", damaged_config("{not json")), "config.json"),
    "config-not-an-object": ([], ("main", damaged_config("[1, 2]")), "config.json"),
    "config-unknown-field": ([], ("main", damaged_config('{"model.colour": "red"}')), "model.colour"),
    "predictions-0-bytes": ([], ("main", empty_predictions), "test.npz cannot be read"),
    "outdir-below-a-file": (["--outdir={file}/analysis"], None, "--outdir"),
    "outdir-in-proc": (["--outdir=/proc/self/no_such/analysis"], None, "--outdir"),
    "compare-nan-logits": (["--analyses=disagreement"], ("compare", changed_predictions(_nan)),
                           "not all finite"),
    "compare-5-classes": (["--analyses=disagreement"],
                          ("compare", changed_predictions(lambda g, y: (g[..., :5], y))),
                          "logits over 5 classes, but the data set has 10"),
    "compare-labels-out-of-range": (["--analyses=disagreement"],
                                    ("compare", changed_predictions(lambda g, y: (g, y + 10))),
                                    "outside the 10 classes"),
    "compare-integer-logits": (["--analyses=disagreement"],
                               ("compare", changed_predictions(lambda g, y: (g.astype(np.int64), y))),
                               "logits of dtype int64"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(row, workdirs, tmp_path):  # noqa: F811
    flags, damage, expected = ROWS[row]
    main, compare = str(tmp_path / "narrow"), str(tmp_path / "wide")
    shutil.copytree(workdirs[0], main)
    shutil.copytree(workdirs[1], compare)
    if damage is not None:
        damage[1](main if damage[0] == "main" else compare)
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a directory")
    out = tmp_path / "out"
    names = {"file": str(regular_file), "missing": str(tmp_path / "missing")}
    args = [f"--workdir={main}", f"--outdir={out}"]
    if "--analyses=disagreement" in flags:
        args.append(f"--compare={compare}")
    args += [f.format(**names) for f in flags]
    before = {p: sorted(os.listdir(p)) for p in (main, compare)}
    result = analyze(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("analyze.py: error: "), result.stderr[-2000:]
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert not out.exists() and regular_file.read_text() == "not a directory"
    assert {p: sorted(os.listdir(p)) for p in (main, compare)} == before
