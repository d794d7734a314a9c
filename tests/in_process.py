"""train.py run in this process: its flag parsing and `main` called directly, so that a test of a
command-line mistake costs no interpreter start (the tests keep one separate-process run per exit
status, in test_train_cli.py and test_bad_inputs_train.py)."""

import contextlib
import importlib.util
import io
import logging
import os
import sys
from unittest import mock

import jax
from absl import flags
from tiny import CACHE_DIR, ROOT

_ALL_DEVICES = jax.devices


def _one_device(backend=None):
    """The first device only: the separate process runs on one CPU device, not the tests' 8."""
    return _ALL_DEVICES(backend)[:1]


def run_train_here(*args: str, one_device: bool = True) -> tuple[int, str]:
    """(exit status, stderr) of `train.py *args` run in this process on one CPU device, as
    `tiny.run_train` runs it in another (``one_device=False``: on all 8 of the tests' devices, as
    a separate process given 8 CPU devices runs it); the flags it defined are removed afterwards."""
    before = set(flags.FLAGS)
    logger = logging.getLogger("cka_jax")  # train.py's main sets it up for the command line
    logger_state = (logger.handlers[:], logger.propagate, logger.level)
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    err, code = io.StringIO(), 0
    try:
        devices = mock.patch.object(jax, "devices", _one_device) if one_device else contextlib.nullcontext()
        with contextlib.redirect_stderr(err), devices:
            spec.loader.exec_module(module)
            module.main(module.parse_flags(["train.py", "--compilation_cache=" + CACHE_DIR, *args]))
    except SystemExit as exited:
        code = exited.code
    finally:
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        sys.modules.pop("config_config", None)  # ml_collections loads every config file under this name
        logger.handlers, logger.propagate, logger.level = logger_state
    return code, err.getvalue()
