"""Training refuses bad input and never reports a broken run as done, loses or mixes runs.

One row per mistake or failure: a diverged run stops (exit 3) and saves nothing diverged; every
config field is checked; one run at a time holds a workdir; the config is kept with the
checkpoints; a torn metrics line never blocks a resume; SIGTERM is honoured during setup; every
mistake on train.py's command line is one line on stderr with exit status 2.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny
from fashion_idx import write_full_size, write_set
from in_process import run_train_here
from tiny import DIGITS, ROOT, run_train, start_train
from tiny import TINY_FLAGS as TINY

from cka_jax.train import loop, workdir_checks
from cka_jax.train import run_checks as checks
from cka_jax.train.health import TrainingDiverged
from cka_jax.workdir import CONFIG_COPIES, Workdir, metrics_log
from cka_jax.workdir.trained import load_trained_population

jax.config.update("jax_compilation_cache_dir", tiny.CACHE_DIR)
ONE_DEVICE = jax.devices()[:1]


def tiny_config(epochs=1, **train):
    """2 models of ResNet-8 (1/4 width) on 144 digits: 4 steps per epoch, as TINY on train.py."""
    return tiny.tiny_config(2, epochs, eval_batch_size=360, **train)


def strict_rows(workdir):
    """metrics.jsonl parsed as strict JSON (bare NaN/Infinity raise)."""

    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}")

    with open(Workdir(workdir).metrics) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def snapshot(workdir):
    """Every file under workdir (but .lock) with its bytes."""
    files = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock":
                files[os.path.relpath(path, workdir)] = open(path, "rb").read()
    return files


# --- 1. divergence -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "learning_rate, every_steps, models, kind",
    [
        (1e30, 0, [0, 1], "non-finite"),  # NaN by the first check (a milestone, step 3)
        (1e3, 1, [0, 1], "exploded"),  # finite, mean loss 1.3e4 > 100 ln 10 at step 2
        (1e2, 1, [0], "exploded"),  # only model 0 (1.1e3 at step 3)
    ],
    ids=["nan", "exploded", "one_model_exploded"],
)
def test_diverged_training_stops_and_saves_nothing_diverged(tmp_path, learning_rate, every_steps, models, kind):
    workdir = str(tmp_path / "run")
    config = tiny_config(epochs=2, learning_rate=learning_rate)
    config.checkpoint.every_steps = every_steps
    with pytest.raises(TrainingDiverged, match=kind) as caught:
        loop.train_and_evaluate(config, workdir, devices=ONE_DEVICE)
    assert caught.value.models == models
    assert f"step {caught.value.step}" in str(caught.value)
    assert not os.path.exists(os.path.join(workdir, "predictions"))
    steps = checkpoint_steps(workdir)
    assert steps and max(steps) < caught.value.step
    for step in steps:  # every checkpoint kept is finite
        params = load_trained_population(workdir, step)[2]
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    rows = strict_rows(workdir)  # the workdir records the divergence, also found inside an epoch
    last = [row for row in rows if row["step"] == caught.value.step]
    assert sorted(row["model"] for row in last if row.get("diverged")) == models
    for row in rows:
        assert row.get("diverged", False) == (row["model"] in models and row["step"] == caught.value.step)


@pytest.mark.slow
def test_diverged_cli_run_exits_3_naming_the_models(tmp_path):
    workdir = str(tmp_path / "run")
    code, err = run_train(*TINY, "--config.train.learning_rate=1e8", "--config.train.epochs=2", "--workdir", workdir)
    assert code == 3, err
    assert "diverged at step" in err and "models 0, 1" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(workdir, "predictions"))


FIELD_MISTAKES = [
    ("train.learning_rate", float("inf"), "train.learning_rate must be a finite number, got inf"),
    ("train.learning_rate", float("nan"), "train.learning_rate must be a finite number, got nan"),
    ("train.learning_rate", 0.0, "train.learning_rate must be > 0"),
    ("train.weight_decay", float("inf"), "train.weight_decay must be a finite number, got inf"),
    ("train.weight_decay", -1e-4, "train.weight_decay must be >= 0"),
    ("train.momentum", float("nan"), "train.momentum must be a finite number, got nan"),
    ("train.momentum", 1.0, "train.momentum must be in [0, 1)"),
    ("train.warmup_epochs", float("inf"), "train.warmup_epochs must be a finite number, got inf"),
    ("train.warmup_epochs", 41.0, "train.warmup_epochs (41.0) must not exceed train.epochs"),
    ("train.label_smoothing", 1.0, "train.label_smoothing must be in [0, 1)"),
    ("train.label_smoothing", float("nan"), "train.label_smoothing must be a finite number"),
    ("data.fraction", 1.5, "data.fraction must be in (0, 1], got 1.5"),
    ("data.seed", -1, "data.seed must be in [0, 4294967296), got -1"),
    ("population.seed", 2**32, "population.seed must be in [0, 4294967296)"),
    ("model.width", float("inf"), "model.width must be a finite number, got inf"),
    ("model.depth", 2.5, "model.depth must be an integer, got 2.5"),
    ("train.epochs", "abc", "train.epochs must be an integer, got 'abc'"),
    ("train.epochs", True, "train.epochs must be an integer, got True"),
    ("train.batch_size", 0, "train.batch_size must be >= 1, got 0"),
    ("train.eval_every_epochs", None, "train.eval_every_epochs must be an integer, got None"),
    ("population.size", 0, "population.size must be >= 1, got 0"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep must be >= 1"),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps must be >= 0"),
    ("checkpoint.keep_at_fractions", (0.5, float("nan")), "keep_at_fractions[1] must be a finite"),
    ("checkpoint.keep_at_fractions", (0.5, 1.5), "keep_at_fractions must be in [0, 1]"),
    ("checkpoint.keep_at_fractions", (), "keep_at_fractions must be a non-empty tuple"),
    ("model.stage_sizes", (3, 0, 6, 3), "model.stage_sizes must be >= 1"),
    ("data.crop_padding", 9, "data.crop_padding must be at most the image side (8)"),
    ("model.residual", 1, "model.residual must be true or false, got 1"),
    ("data.name", "mnist", "unknown data set 'mnist'"),
    ("data.data_dir", "/data/digits", "data.data_dir=/data/digits is given, but digits comes with scikit-learn"),
]


@pytest.mark.parametrize("field, value, message", FIELD_MISTAKES, ids=[f"{f}={v!r}" for f, v, _ in FIELD_MISTAKES])
def test_every_config_field_is_checked(field, value, message):
    config = tiny_config()
    section, name = field.split(".")
    with config.ignore_type():
        config[section][name] = value
    with pytest.raises(checks.RunConfigError, match=re.escape(message)):
        checks.check_run(config, ONE_DEVICE)


# --- 2. the workdir lock ----------------------------------------------------------------------

HOLD_LOCK = (
    "import sys, time\nfrom cka_jax.workdir import lock as workdir_lock\n"
    "workdir_lock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)\n"
)


@pytest.mark.slow
def test_a_locked_workdir_is_refused_and_a_killed_holder_releases_it(tmp_path):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = f"in use by process {holder.pid}"
        with pytest.raises(checks.RunConfigError, match=busy):
            loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
        code, err = run_train(*TINY, "--config.train.epochs=1", "--workdir", workdir)
        assert code == 2 and err.count("\n") == 1 and busy in err, err
        assert not os.path.exists(Workdir(workdir).metrics)
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, the lock file stays behind
        holder.wait()
    assert os.path.exists(os.path.join(workdir, ".lock"))
    result = loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    assert not result.interrupted
    assert [(r["epoch"], r["model"]) for r in strict_rows(workdir)] == [(1, 0), (1, 1)]


# --- 3. the config kept with the checkpoints --------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch run; tests work on copies of it."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    loop.train_and_evaluate(tiny_config(), workdir, devices=ONE_DEVICE)
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    return workdir


def other_learning_rate():
    return tiny_config(learning_rate=0.05)


def other_architecture():
    config = tiny_config()
    config.model.depth = 14
    return config


@pytest.mark.slow
@pytest.mark.parametrize("deleted", ["config.json", "checkpoints/config.json"])
@pytest.mark.parametrize("other", [other_learning_rate, other_architecture], ids=["learning_rate", "architecture"])
def test_another_run_is_refused_whichever_config_copy_is_missing(run_copy, deleted, other):
    os.remove(os.path.join(run_copy, deleted))
    before = snapshot(run_copy)
    with pytest.raises(checks.RunConfigError, match="different config"):
        loop.train_and_evaluate(other(), run_copy, devices=ONE_DEVICE)
    assert snapshot(run_copy) == before and not os.path.exists(run_copy + "/checkpoints.corrupt")


@pytest.mark.slow
@pytest.mark.parametrize("deleted", ["config.json", "checkpoints/config.json"])
def test_the_same_run_resumes_and_restores_the_missing_copy(run_copy, deleted):
    kept = open(os.path.join(run_copy, "checkpoints/config.json" if deleted == "config.json" else "config.json")).read()
    os.remove(os.path.join(run_copy, deleted))
    result = loop.train_and_evaluate(tiny_config(), run_copy, devices=ONE_DEVICE)
    assert result.step == result.total_steps
    assert open(os.path.join(run_copy, deleted)).read() == kept


@pytest.mark.slow
def test_a_run_without_either_config_copy_is_refused(run_copy):
    for name in CONFIG_COPIES:
        os.remove(os.path.join(run_copy, name))
    before = snapshot(run_copy)
    with pytest.raises(checks.RunConfigError, match="neither of its config copies"):
        loop.train_and_evaluate(tiny_config(), run_copy, devices=ONE_DEVICE)
    assert snapshot(run_copy) == before


DAMAGED_CONFIGS = {
    "unparseable": '{"train.epochs": 1,',
    "not_an_object": "[1, 2]",
    "unknown_field": '{"train.learning_rat": 0.1}',
    "nan": '{"train.momentum": NaN}',
    "wrong_kind": '{"train.epochs": "abc"}',
    "empty": "",
}


@pytest.mark.slow
@pytest.mark.parametrize("text", DAMAGED_CONFIGS.values(), ids=DAMAGED_CONFIGS.keys())
@pytest.mark.parametrize("name", ["config.json", "checkpoints/config.json"])
def test_a_damaged_config_copy_is_refused_and_left_alone(run_copy, name, text):
    with open(os.path.join(run_copy, name), "w") as f:
        f.write(text)
    before = snapshot(run_copy)
    with pytest.raises(checks.RunConfigError, match=f"{name} is damaged.*delete it"):
        loop.train_and_evaluate(tiny_config(), run_copy, devices=ONE_DEVICE)
    assert snapshot(run_copy) == before


# --- 4. a torn metrics line -------------------------------------------------------------------


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    calls = iter(range(100))
    stopped = loop.train_and_evaluate(
        tiny_config(epochs=2), workdir, devices=ONE_DEVICE, should_stop=lambda: next(calls) == 6
    )  # step 6
    assert stopped.interrupted and stopped.step == 6
    with open(Workdir(workdir).metrics, "a") as f:
        f.write('{"epoch": 2, "step": 8, "model": 0, "train_lo')  # a crash mid-append
    resumed = loop.train_and_evaluate(tiny_config(epochs=2), workdir, devices=ONE_DEVICE)
    assert not resumed.interrupted
    assert [(r["epoch"], r["model"]) for r in strict_rows(workdir)] == [(e, m) for e in (1, 2) for m in (0, 1)]
    assert "torn last line" in caplog.text


@pytest.mark.parametrize(
    "tail, rows",
    [
        ('{"step": 2, "a": 2', [{"step": 1}, {"step": 3}]),  # torn: dropped
        ('{"step": 2}', [{"step": 1}, {"step": 2}, {"step": 3}]),  # whole, no newline: kept
    ],
    ids=["torn", "no_newline"],
)
def test_metrics_append_never_leaves_a_torn_line_inside(tmp_path, tail, rows):
    path = str(tmp_path / "metrics.jsonl")
    metrics_log.append(path, [{"step": 1}])
    with open(path, "a") as f:
        f.write(tail)
    metrics_log.append(path, [{"step": 3}])
    assert [json.loads(line) for line in open(path)] == rows


def test_metrics_rows_are_strict_json(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    metrics_log.append(path, [{"loss": float("nan"), "x": float("inf"), "y": 1.5}])
    assert open(path).read() == '{"loss": null, "x": null, "y": 1.5}\n'
    assert metrics_log.read(path) == [{"loss": None, "x": None, "y": 1.5}]


# --- 5. signals during setup ------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_while_starting_exits_143_at_once(tmp_path):
    workdir = str(tmp_path / "run")
    proc = start_train(*TINY, "--workdir", workdir)
    time.sleep(0.5)  # still importing jax
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not os.path.exists(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_setup_stops_before_training_and_resumes(tmp_path, signum):
    workdir = str(tmp_path / "run")
    # setup includes timing the chunk sizes (population.strategy=auto, the default)
    args = [*TINY, "--config.train.epochs=2", "--config.population.strategy=auto", "--workdir", workdir]
    proc = start_train(*args)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(workdir, "config.json")):  # setup has begun
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    steps = checkpoint_steps(workdir) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
    assert set(steps) <= {0}, steps  # no training step was taken
    assert not os.path.exists(Workdir(workdir).metrics)
    code, err = run_train(*args)
    assert code == 0, err
    assert [r["epoch"] for r in strict_rows(workdir)] == [1, 1, 2, 2]


# --- 6. one-line errors on train.py's command line --------------------------------------------


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def _file(tmp):
    return _write(os.path.join(tmp, "a_file"), "")


FASHION = os.path.join(ROOT, "configs", "fashion_mnist.py")


def _fashion(data_dir):
    """train.py's flags of a tiny Fashion-MNIST run (120 training images) reading `data_dir`."""
    return [
        "--config",
        FASHION + ":depth=8,width=0.25,size=1,epochs=1,fraction=0.002",
        f"--config.data.data_dir={data_dir}",
    ]


def _idx_files(tmp, kind):
    """A directory of Fashion-MNIST IDX files under `tmp`: `kind` says what is wrong with them."""
    directory = os.path.join(tmp, kind)
    if kind == "lacks_a_file":
        write_set(directory)
        os.remove(os.path.join(directory, "t10k-labels-idx1-ubyte.gz"))
    elif kind == "swapped":
        write_full_size(directory, swapped=True)
    elif kind == "empty":
        write_set(directory, num_train=0, num_test=0)
    elif kind == "none":
        os.makedirs(directory)
    else:
        write_full_size(directory)
    return directory


CLI_MISTAKES = [
    # (id, arguments given tmp_path -> list, substrings of the error line)
    ("missing_config_file", lambda t: ["--config", f"{t}/nowhere.py"], ["nowhere.py", "does not exist"]),
    ("config_syntax_error", lambda t: ["--config", _write(f"{t}/bad.py", "def get_config(:\n")], ["bad.py, line 1"]),
    (
        "config_without_get_config",
        lambda t: ["--config", _write(f"{t}/empty.py", "x = 1\n")],
        ["config file defines no get_config"],
    ),
    (  # the config file's own AttributeError is not taken for an unknown field
        "config_raises_attribute_error",
        lambda t: ["--config", _write(f"{t}/raises.py", "def get_config():\n    return None.x\n")],
        ["AttributeError: 'NoneType' object has no attribute 'x'"],
    ),
    ("bad_config_argument", lambda t: ["--config", DIGITS + ":depth=abc"], ["depth", "'abc'"]),
    ("unknown_config_argument", lambda t: ["--config", DIGITS + ":dpth=8"], ["dpth=8"]),
    ("warmup_inf", lambda t: TINY + ["--config.train.warmup_epochs=inf"], ["warmup_epochs", "inf"]),
    ("momentum_nan", lambda t: TINY + ["--config.train.momentum=nan"], ["momentum", "nan"]),
    ("learning_rate_inf", lambda t: TINY + ["--config.train.learning_rate=inf"], ["learning_rate", "inf"]),
    ("weight_decay_inf", lambda t: TINY + ["--config.train.weight_decay=inf"], ["weight_decay", "inf"]),
    ("population_size_0", lambda t: TINY + ["--config.population.size=0"], ["population.size", "0"]),
    ("epochs_abc", lambda t: TINY + ["--config.train.epochs=abc"], ["epochs", "abc"]),
    ("epochs_float", lambda t: TINY + ["--config.train.epochs=2.5"], ["epochs", "2.5"]),
    (
        "unknown_config_field",
        lambda t: TINY + ["--config.train.learning_rat=1"],
        ["'learning_rat'", "'learning_rate'?"],
    ),
    ("bad_flag_name", lambda t: TINY + ["--bogus=1"], ["bogus"]),
    ("positional_argument", lambda t: TINY + ["extra"], ["extra"]),
    ("workdir_is_a_file", lambda t: TINY + ["--workdir", _file(t)], ["a_file", "is a file"]),
    ("workdir_under_a_file", lambda t: TINY + ["--workdir", _file(t) + "/run"], ["a_file/run"]),
    # an existing directory no one may create files in (chmod does not stop root; /proc does)
    ("workdir_read_only", lambda t: TINY + ["--workdir", "/proc/self"], ["/proc/self"]),
    (
        "damaged_config_json",
        lambda t: TINY + ["--workdir", os.path.dirname(_write(f"{t}/run/config.json", "{oops"))],
        ["config.json is damaged"],
    ),
    # a data location given is used or refused, never replaced; the splits are Fashion-MNIST's;
    # the refused run leaves nothing in the workdir (it used to leave config.json, .lock, checkpoints/)
    ("data_dir_does_not_exist", lambda t: _fashion(f"{t}/nowhere"), ["data.data_dir=", "nowhere does not exist"]),
    (
        "data_dir_lacks_a_file",
        lambda t: _fashion(_idx_files(t, "lacks_a_file")),
        ["lacks_a_file lacks Fashion-MNIST's t10k-labels-idx1-ubyte"],
    ),
    ("train_and_test_swapped", lambda t: _fashion(_idx_files(t, "swapped")), ["holds 10000 images", "swapped"]),
    ("empty_idx_files", lambda t: _fashion(_idx_files(t, "empty")), ["holds 0 images", "has 60000"]),
    ("data_dir_without_the_data", lambda t: _fashion(_idx_files(t, "none")), ["none holds none of Fashion-MNIST's"]),
    (
        "tfds_data_dir_not_prepared",  # tfds's own "Variant folder ... has no dataset_info.json" was a 2nd line
        lambda t: [
            "--config",
            os.path.join(ROOT, "configs", "cifar10.py:depth=8,size=1"),
            f"--config.data.data_dir={t}",
        ],
        ["'cifar10' (split 'train') is not prepared in "],
    ),
    ("digits_with_a_data_dir", lambda t: TINY + [f"--config.data.data_dir={t}"], ["digits comes with scikit-learn"]),
]


# Each mistake runs train.py in this process; one also runs it as its own process (the exit status
# and the one line as a user sees them).
SEPARATE_PROCESS = {"bad_flag_name"}


@pytest.mark.parametrize(
    "make_args, expected, separate",
    [
        pytest.param(a, e, i in SEPARATE_PROCESS, id=i, marks=[pytest.mark.slow] if i in SEPARATE_PROCESS else [])
        for i, a, e in CLI_MISTAKES
    ],
)
def test_a_command_line_mistake_is_one_line_and_exit_2(tmp_path, make_args, expected, separate):
    args = make_args(str(tmp_path))
    if "--workdir" not in args:
        args += ["--workdir", str(tmp_path / "run")]
    workdir = args[args.index("--workdir") + 1]
    before = snapshot(workdir) if workdir.startswith(str(tmp_path)) and os.path.isdir(workdir) else None
    code, err = run_train(*args, timeout=120) if separate else run_train_here(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    for text in expected:
        assert text in lines[0], err
    if before is not None:
        assert snapshot(workdir) == before  # nothing written
    elif os.path.isdir(str(tmp_path / "run")):
        assert not os.listdir(str(tmp_path / "run"))


@pytest.mark.slow
def test_a_refused_nan_leaves_the_workdir_usable(tmp_path):
    workdir = str(tmp_path / "run")
    code, _ = run_train(*TINY, "--config.train.momentum=nan", "--workdir", workdir, timeout=120)
    assert code == 2 and not os.path.exists(os.path.join(workdir, "config.json"))
    config = tiny_config()
    workdir_checks.check_workdir(workdir, config)  # a valid run may use it
    assert json.load(open(os.path.join(workdir, "config.json")))["train.momentum"] == 0.9


# --- 7. a run refused for its data, and the modes of the files a run writes ---------------------


def _fashion_config(data_dir):
    """The in-process twin of `_fashion`: 1 ResNet-8 (1/4 width), 120 training images, 3 steps."""
    config = tiny.tiny_config(1, 1, eval_batch_size=1000)
    config.data.name, config.data.crop_padding, config.data.fraction = "fashion_mnist", 2, 0.002
    config.data.data_dir = data_dir
    return config


@pytest.mark.slow
def test_a_run_refused_for_its_data_leaves_nothing_and_the_corrected_one_runs(tmp_path):
    """The refused run used to leave config.json, .lock and checkpoints/, and the corrected
    command (another data.data_dir) was then refused as "a different config"."""
    from cka_jax.data.datasets import DataNotAvailableError

    workdir = str(tmp_path / "run")
    with pytest.raises(DataNotAvailableError, match="lacks Fashion-MNIST's t10k-labels-idx1-ubyte"):
        loop.train_and_evaluate(_fashion_config(_idx_files(str(tmp_path), "lacks_a_file")), workdir, devices=ONE_DEVICE)
    assert not os.path.exists(workdir)
    os.makedirs(workdir)
    with pytest.raises(DataNotAvailableError, match="swapped"):
        loop.train_and_evaluate(_fashion_config(_idx_files(str(tmp_path), "swapped")), workdir, devices=ONE_DEVICE)
    assert os.listdir(workdir) == []  # the directory was there before the run: it stays
    result = loop.train_and_evaluate(_fashion_config(_idx_files(str(tmp_path), "good")), workdir, devices=ONE_DEVICE)
    assert result.step == result.total_steps == 3
    assert json.load(open(os.path.join(workdir, "config.json")))["data.data_dir"].endswith("good")


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_file_of_a_run_has_the_umasks_mode(tmp_path, umask):
    """config.json, the metrics, predictions, checkpoints (orbax's files and the manifest),
    population_strategy.json and the lock: 0o666 less the umask (atomic writes were 0o600)."""
    workdir = str(tmp_path / "run")
    previous = os.umask(umask)
    try:
        loop.train_and_evaluate(
            tiny.tiny_config(2, 1, strategy="auto", eval_batch_size=360), workdir, devices=ONE_DEVICE
        )
    finally:
        os.umask(previous)
    modes = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            kind = 0o777 if os.path.isdir(path) else 0o666
            modes[os.path.relpath(path, workdir)] = (oct(os.stat(path).st_mode & 0o777), oct(kind & ~umask))
    wrong = {path: mode for path, mode in modes.items() if mode[0] != mode[1]}
    assert not wrong, wrong
    expected = {"config.json", "checkpoints/config.json", "metrics.jsonl", "predictions/test.npz", ".lock"}
    assert expected | {"population_strategy.json", "checkpoints/4/default/cka_jax_manifest.json"} <= set(modes)
