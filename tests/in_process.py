"""train.py and analyze.py run in this process: their flag parsing and `main` called directly, so
that a test of a command-line mistake (or of what analyze.py writes) costs no interpreter start
and no second import of jax and the analysis package (the tests keep separate-process runs of
each exit status: test_train_cli.py, test_bad_inputs_train.py, test_bad_inputs_analysis.py and
the stop-signal tests of test_analyze_cli.py)."""

import contextlib
import importlib.util
import io
import logging
import os
import signal
import subprocess
import sys
import warnings
from unittest import mock

import jax
import matplotlib
from absl import flags
from absl import logging as absl_logging
from tiny import CACHE_DIR, ROOT

_ALL_DEVICES = jax.devices


def _one_device(backend=None):
    """The first device only: the separate process runs on one CPU device, not the tests' 8."""
    return _ALL_DEVICES(backend)[:1]


def _script(name: str):
    """The repository's script `name` (train.py, analyze.py) loaded afresh as a module (not as
    __main__: its flags are defined, its `if __name__ == "__main__"` block is not run)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_cli", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _command_line_state(*logger_names: str):
    """Puts back, on the way out, what a script's command line sets up in this process: the flags
    it defines and the handlers, propagation and level of loggers `logger_names`."""
    before = set(flags.FLAGS)
    loggers = [logging.getLogger(name) for name in logger_names]
    states = [(logger.handlers[:], logger.propagate, logger.level) for logger in loggers]
    try:
        yield
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        for logger, (handlers, propagate, level) in zip(loggers, states, strict=True):
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level


def run_train_here(*args: str, one_device: bool = True) -> tuple[int, str]:
    """(exit status, stderr) of `train.py *args` run in this process on one CPU device, as
    `tiny.run_train` runs it in another (``one_device=False``: on all 8 of the tests' devices, as
    a separate process given 8 CPU devices runs it); the flags it defined are removed afterwards."""
    err, code = io.StringIO(), 0
    try:
        devices = mock.patch.object(jax, "devices", _one_device) if one_device else contextlib.nullcontext()
        # train.py's main sets up the "cka_jax" logger for the command line
        with _command_line_state("cka_jax"), contextlib.redirect_stderr(err), devices:
            module = _script("train.py")
            module.main(module.parse_flags(["train.py", "--compilation_cache=" + CACHE_DIR, *args]))
    except SystemExit as exited:
        code = exited.code
    finally:
        sys.modules.pop("config_config", None)  # ml_collections loads every config file under this name
    return code, err.getvalue()


ANALYZE_LOGGERS = ("cka_jax", "cka_jax.analysis")  # analyze.py sets their levels and handler
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # analyze.py's main handles them
# Python's warning filters when no -W option is given (pytest's show more); analyze.py is the
# separate process's __main__ and this process's analyze_cli
DEFAULT_WARNING_FILTERS = (
    ("default", DeprecationWarning, "__main__|analyze_cli"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Prints a warning on sys.stderr, as Python does in a process of its own (pytest collects it)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _stderr_of_a_process(err: io.StringIO):
    """sys.stderr is `err`, which also gets what a separate process would print on its stderr
    rather than what pytest collects: warnings (under Python's default filters) and log records of
    WARNING and above that reach the root logger (absl's handler prints them in analyze.py's
    process)."""
    root, handler = logging.getLogger(), logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    root_level = root.level
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in DEFAULT_WARNING_FILTERS:
            warnings.filterwarnings(action, category=category, module=module, append=True)
        warnings.showwarning = _show_warning
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(root_level)


def run_analyze_here(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """`analyze.py *args` run in this process from `cwd`, as `tiny.analyze` runs it in another: a
    CompletedProcess with its exit status, stdout and stderr (as text). Both see the tests' 8 CPU
    devices (the separate process inherits their XLA_FLAGS). What analyze.py sets up for its
    command line is put back afterwards: the flags it defined, its loggers' handlers, levels and
    propagation, absl's verbosity, matplotlib's backend and the stop signals' handlers. Its stderr
    holds what the process would print there through Python (see `_stderr_of_a_process`), not what
    libraries write to file descriptor 2 themselves: the separate-process tests see that."""
    verbosity = absl_logging.get_verbosity()
    backend = matplotlib.rcParams._get("backend")  # unresolved as it is: reading it would pick one
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with _command_line_state(*ANALYZE_LOGGERS), contextlib.chdir(cwd), contextlib.redirect_stdout(out):
            with _stderr_of_a_process(err):
                module = _script("analyze.py")
                module.main(module.parse_flags(["analyze.py", *args]))
    except SystemExit as exited:
        code = exited.code
    finally:
        absl_logging.set_verbosity(verbosity)
        matplotlib.rcParams._set("backend", backend)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return subprocess.CompletedProcess(["analyze.py", *args], code, out.getvalue(), err.getvalue())
