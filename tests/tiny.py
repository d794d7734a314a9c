"""The tiny training runs the tests use: ResNet-8 populations on 144 digits, 4 steps per epoch,
in this process (`tiny_config`) or through train.py (`TINY_FLAGS`, `start_train`, `run_train`);
analyze.py run on them (`analyze`)."""

import os
import subprocess
import sys
import tempfile

from cka_jax.workdir.config import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")
# The tests compile the same small programs again and again: keep them across tests and runs, in
# the cache conftest.py chose (one for every xdist worker and the processes they start).
CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "cka_jax_tests_xla")
# train.py's flags for 2 models of ResNet-8 (1/4 width) on 144 digits: 4 steps per epoch, one
# model per call (population.strategy=auto would time both chunk sizes first: test_strategy_tuning
# tests it; the setup-signal tests ask for it).
TINY_FLAGS = [
    "--config",
    DIGITS + ":depth=8,width=0.25,size=2",
    "--config.data.fraction=0.1",
    "--config.train.batch_size=32",
    "--config.train.eval_batch_size=360",
    "--config.population.strategy=loop",
]


def tiny_config(size=2, epochs=1, *, width=0.25, strategy="loop", eval_batch_size=180, milestones=None, **train):
    """A run config: `size` ResNet-8 (`width`×) on a 0.1 fraction of digits (144 train images) in
    batches of 32 (4 steps per epoch); `train` sets further train.* fields; `milestones` sets
    checkpoint.keep_at_fractions."""
    c = base_config()
    c.data.fraction, c.data.crop_padding, c.data.flip = 0.1, 1, False
    c.model.depth, c.model.width = 8, width
    c.population.size, c.population.strategy = size, strategy
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = epochs, 32, eval_batch_size
    for name, value in train.items():
        c.train[name] = value
    if milestones is not None:
        c.checkpoint.keep_at_fractions = milestones
    return c


def _train_command(args, script):
    program = ["-c", script] if script else [os.path.join(ROOT, "train.py")]
    return [sys.executable, *program, "--compilation_cache=" + CACHE_DIR, *args]


def _one_cpu_device_env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # not the tests' 8 devices


def start_train(*args, script=None):
    """train.py with `args` in a subprocess on one CPU device (stdout and stderr piped, as text),
    with the tests' compilation cache. `script`: Python code run instead, which runs train.py
    itself (after making something fail, say)."""
    return subprocess.Popen(
        _train_command(args, script),
        cwd=ROOT,
        env=_one_cpu_device_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_train(*args, script=None, timeout=300):
    """(exit status, stderr) of `start_train(*args, script=script)` run to its end."""
    done = subprocess.run(
        _train_command(args, script),
        cwd=ROOT,
        env=_one_cpu_device_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stderr


def analyze(*args, cwd=ROOT):
    """analyze.py with `args` in a subprocess on CPU, run to its end (a CompletedProcess: returncode,
    stdout, stderr as text)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "analyze.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
