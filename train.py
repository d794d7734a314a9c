r"""Train a population of M seeds of one ResNet on every device, resumable from its workdir.

  python train.py                                   # digits default (configs/digits.py) → workdir/default
  python train.py --config configs/cifar10.py:depth=62,width=1,size=10 --workdir workdir/c10_r62
  python train.py --config configs/cifar10.py --config.model.width=4 --config.population.size=8 \
      --workdir workdir/c10_r14_w4
  python train.py --config configs/paper_pairs.py:wide --workdir workdir/pairs_wide

Any config field can be overridden with --config.<field>=<value>. Re-running the same command
resumes from the workdir's latest checkpoint. Outputs: config.json, checkpoints/, metrics.jsonl,
predictions/test.npz. One run at a time writes into a workdir (it holds <workdir>/.lock).

Exit status:
  0    done: every model trained, predictions written.
  1    a checkpoint, metrics.jsonl or the predictions could not be written (disk full): one
       line; earlier checkpoints are kept and the same command resumes from them.
  2    a mistake in the command (flag, config file, config value, workdir, a workdir that holds
       another run or is in use): one line on stderr saying what to change; nothing was written.
  3    training diverged (a non-finite loss or parameter, or an exploded loss): the message names
       the models and the step; the last finite checkpoint is kept, no predictions are written.
  128 + signal   stopped by SIGTERM (143) or SIGINT (130), at any time from start-up on; what was
       trained is checkpointed and the same command resumes.
"""

import signal
import sys

_EARLY_SIGNALS: list[int] = []  # SIGTERM/SIGINT received before main took over their handling
if __name__ == "__main__":  # the imports below take seconds: honour a signal sent meanwhile
    for _signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signal, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import errno  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from typing import NoReturn  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from cka_jax.train import checkpoints, data, loop  # noqa: E402
from cka_jax.train import config as run_config  # noqa: E402
from cka_jax.train.health import TrainingDiverged  # noqa: E402
from cka_jax.train.run_checks import RunConfigError, check_run  # noqa: E402
from cka_jax.train.stop_signal import StopOnSignal  # noqa: E402
from cka_jax.train.workdir_checks import check_workdir, lock_workdir  # noqa: E402
from cka_jax.workdir import Workdir  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")
EXIT_DISK_FULL, EXIT_USAGE, EXIT_DIVERGED = 1, 2, 3


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    """Exit with ``status`` after one line on stderr."""
    print("train.py: error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(status)


def stopped(signum: int, what: str) -> NoReturn:
    """Exit with 128 + ``signum`` after saying what the signal stopped."""
    print(f"train.py: stopped by signal {signum} {what}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def reject_unknown_overrides(argv: list[str]) -> None:
    """``ValueError`` naming a --config.<field> override of a field that does not exist."""
    known = set(run_config.flat_config(run_config.base_config()))
    for arg in argv[1:]:
        match = re.match(r"-{1,2}(no)?config\.([^=]*)", arg)
        if match:
            field = match.group(2)
            if field not in known and not any(k.startswith(field + ".") for k in known):
                raise ValueError(f"unknown config field '{field}' in {arg}")


def config_spec(argv: list[str]) -> str:
    """The value of --config in ``argv`` (the last one, as absl takes it), or the default."""
    spec = DEFAULT_CONFIG
    for i, arg in enumerate(argv[1:], 1):
        if re.fullmatch(r"-{1,2}config", arg) and i + 1 < len(argv):
            spec = argv[i + 1]
        elif re.match(r"-{1,2}config=", arg):
            spec = arg.split("=", 1)[1]
    return spec


class TrainCommand:
    """train.py's flags, defined into ``flag_values`` when constructed (not on import), and what the
    command does with them: ``app.run(command.main, flags_parser=command.parse_flags)``."""

    def __init__(self, flag_values: flags.FlagValues = flags.FLAGS):
        self.flag_values = flag_values
        self.workdir = flags.DEFINE_string(
            "workdir", "workdir/default", "Run directory (created; resumed).", flag_values=flag_values
        )
        self.compilation_cache = flags.DEFINE_string(
            "compilation_cache",
            os.path.expanduser("~/.cache/cka_jax/xla"),
            "Directory of JAX's persistent compilation cache (resumed runs skip compiling); '' disables.",
            flag_values=flag_values,
        )
        self.distributed = flags.DEFINE_bool(
            "distributed",
            False,
            "Call jax.distributed.initialize() first (multi-host, e.g. TPU pods).",
            flag_values=flag_values,
        )
        self.config: flags.FlagHolder | None = None  # --config, defined by parse_flags once its file loads

    def parse_flags(self, argv: list[str]) -> list[str]:
        """absl flag parsing with a one-line error and exit status 2 instead of a traceback.

        The config file is loaded first on its own (its mistakes are one line too), then the --config
        flag is defined, reading its --config.<field> overrides from ``argv``.
        """
        try:
            argv = self.flag_values.read_flags_from_files(argv, force_gnu=False)
            reject_unknown_overrides(argv)
            run_config.load_config_file(config_spec(argv))
            self.config = config_flags.DEFINE_config_file(
                "config",
                DEFAULT_CONFIG,
                "Config file (optionally `path.py:arg`).",
                flag_values=self.flag_values,
                lock_config=True,
                sys_argv=argv,
            )
            return self.flag_values(argv)
        except (flags.Error, ValueError, TypeError) as error:
            fail(f"{error} (pass --help for usage)")

    def main(self, argv: list[str]) -> None:
        """Train with the parsed flags; exits 0 done, 1 disk full, 2 a mistake, 3 diverged, 128 + signal."""
        with StopOnSignal() as stop:
            if _EARLY_SIGNALS:
                stopped(_EARLY_SIGNALS[0], "while starting; nothing was written")
            if len(argv) > 1:
                fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
            try:
                self.run(self.config.value, self.workdir.value, stop)
            except (RunConfigError, data.DataNotAvailableError) as error:
                fail(str(error))
            except TrainingDiverged as error:
                fail(str(error), EXIT_DIVERGED)
            except checkpoints.CheckpointWriteError as error:
                fail(str(error), EXIT_DISK_FULL)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                fail(
                    f"disk full writing into {error.filename or self.workdir.value} ({error.strerror}); checkpoints "
                    "already written are kept; free space and rerun the same command to resume",
                    EXIT_DISK_FULL,
                )

    def run(self, config, workdir: str, stop: StopOnSignal) -> None:
        """Check, lock, train (or resume); exits 128 + signal when stopped by one."""
        if self.distributed.value:
            jax.distributed.initialize()
        if self.compilation_cache.value:
            jax.config.update("jax_compilation_cache_dir", self.compilation_cache.value)
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines
        package_logger = logging.getLogger("cka_jax")
        package_logger.setLevel(logging.INFO)
        package_logger.addHandler(logging.StreamHandler(sys.stderr))
        package_logger.propagate = False
        model, layout = check_run(config)
        with lock_workdir(workdir):
            check_workdir(workdir, config)
            if stop.is_set():
                stopped(stop.received, "before training; run the same command to start it")
            bar = tqdm(
                total=config.train.epochs,
                unit="epoch",
                desc=os.path.basename(workdir.rstrip("/")),
                disable=jax.process_index() != 0,
            )
            with logging_redirect_tqdm([package_logger]), bar:
                result = loop.train_checked(config, workdir, model, layout, progress=bar, should_stop=stop.is_set)
        if result.interrupted:
            package_logger.info(
                "interrupted at step %d of %d; run the same command to resume", result.step, result.total_steps
            )
            sys.exit(128 + (stop.received or 0))
        package_logger.info("wrote %s", Workdir(workdir).predictions)


if __name__ == "__main__":
    command = TrainCommand()
    app.run(command.main, flags_parser=command.parse_flags)
