r"""Train a population of M seeds of one ResNet on every device, resumable from its workdir.

  python train.py                                   # digits default (configs/digits.py) → workdir/default
  python train.py --config configs/cifar10.py:depth=62,width=1,size=10 --workdir workdir/c10_r62
  python train.py --config configs/cifar10.py --config.model.width=4 --config.population.size=8 \
      --workdir workdir/c10_r14_w4
  python train.py --config configs/paper_pairs.py:wide --workdir workdir/pairs_wide

Any config field can be overridden with --config.<field>=<value>. Re-running the same command
resumes from the workdir's latest checkpoint. Outputs: config.json, checkpoints/, metrics.jsonl,
predictions/test.npz. One run at a time writes into a workdir (it holds <workdir>/.lock).

Several processes (hosts) train one population together when every one of them runs the same
command with --distributed (TPU pods, SLURM and Open MPI are detected) or with its own
--process_id and the same --coordinator_address and --num_processes; the workdir must be storage
that every process sees. Process 0 locks the workdir and writes config.json, metrics.jsonl and
predictions/test.npz; every process writes its shards of each checkpoint.

  python train.py --coordinator_address=10.0.0.1:7777 --num_processes=2 --process_id=0 --workdir=/shared/run
  python train.py --coordinator_address=10.0.0.1:7777 --num_processes=2 --process_id=1 --workdir=/shared/run

Exit status:
  0    done: every model trained, predictions written.
  1    a checkpoint, metrics.jsonl or the predictions could not be written (disk full): one
       line; earlier checkpoints are kept and the same command resumes from them.
  2    a mistake in the command (flag, config file, config value, workdir, a workdir that holds
       another run or is in use): one line on stderr saying what to change; nothing was written.
  3    training diverged (a non-finite loss or parameter, or an exploded loss): the message names
       the models and the step; the last finite checkpoint is kept, no predictions are written.
  4    several processes: one did not connect within --initialization_timeout, or an exchange
       with another one failed (it died); one line.
  128 + signal   stopped by SIGTERM (143), SIGINT (130) or SIGHUP (129, the terminal closed), at
       any time from start-up on; what was trained is checkpointed and the same command resumes.
       Several processes all stop at the same step: a stop signal to any one of them stops every
       one, and each exits 143 (130 or 129 the process that got a SIGINT or SIGHUP).
  134  several processes: another one sent no heartbeat for --heartbeat_timeout_seconds (it died or
       hangs); JAX aborts this one ("Terminating process because the JAX distributed service ...").
"""

import signal
import sys

_EARLY_SIGNALS: list[int] = []  # stop signals received before main took over their handling
if __name__ == "__main__":  # the imports below take seconds: honour a signal sent meanwhile
    for _signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(_signal, lambda signum, frame: _EARLY_SIGNALS.append(signum))

import errno  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from typing import Any, NoReturn  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from cka_jax.data import datasets as data  # noqa: E402
from cka_jax.train import checkpoints, loop  # noqa: E402
from cka_jax.train.health import TrainingDiverged  # noqa: E402
from cka_jax.train.population import failed_exchange  # noqa: E402
from cka_jax.train.run_checks import check_run  # noqa: E402
from cka_jax.train.stop_signal import StopOnSignal  # noqa: E402
from cka_jax.train.workdir_checks import check_workdir, lock_workdir  # noqa: E402
from cka_jax.workdir import Workdir, orbax_noise  # noqa: E402
from cka_jax.workdir import config as run_config  # noqa: E402
from cka_jax.workdir.config import RunConfigError  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")
EXIT_DISK_FULL, EXIT_USAGE, EXIT_DIVERGED, EXIT_LOST_PROCESS = 1, 2, 3, 4
# Seconds JAX waits for the processes to connect beyond --initialization_timeout: the one-line
# error at --initialization_timeout comes first.
INITIALIZATION_MARGIN_S = 10


def fail(message: str, status: int = EXIT_USAGE, alone: bool = False) -> NoReturn:
    """Exit with ``status`` after one line on stderr; ``alone``: at once, without JAX's shutdown
    barrier (an error of this process only, when several train together)."""
    print("train.py: error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    if alone:
        os._exit(status)
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


def _address_problem(address: str) -> str | None:
    """Why ``address`` is not ``host:port`` (IPv6 hosts in brackets), or None."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or host in ("[", "[]"):
        return "is not host:port"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"has port '{port}', not a number from 1 to 65535"
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return "is not host:port (write an IPv6 host in brackets: [::1]:port)"
    return None


def distributed_options(
    distributed: bool,
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: int = 100,
) -> dict[str, Any] | None:
    """``jax.distributed.initialize``'s keyword arguments for these flags, None for one process.

    ``--distributed`` alone lets JAX detect the cluster; any of the other three asks for all three.
    ``ValueError`` (one line naming the flag) for a combination that cannot work.
    """
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    given = [name for name, value in explicit.items() if value is not None]
    if not distributed and not given:
        return None
    timeouts = dict(initialization_timeout=initialization_timeout, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    for name, value in timeouts.items():
        if value < 1:
            raise ValueError(f"--{name}={value} must be at least 1 (seconds)")
    if not given:
        return timeouts
    missing = [name for name in explicit if name not in given]
    if missing:
        raise ValueError(
            f"--{' and --'.join(missing)} missing: give --coordinator_address, --num_processes and --process_id "
            "together, or none of them with --distributed to detect the cluster (TPU pods, SLURM, Open MPI)"
        )
    assert coordinator_address is not None and num_processes is not None and process_id is not None
    problem = _address_problem(coordinator_address)
    if problem:
        raise ValueError(f"--coordinator_address={coordinator_address} {problem}; give process 0's host:port")
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} must be from 0 to --num_processes - 1 = {num_processes - 1}; "
            "give each process its own index"
        )
    return {**explicit, **timeouts}


def lost_process(error: BaseException) -> NoReturn:
    """One line and exit 4 when an exchange across processes failed (at once: JAX's shutdown
    barrier would wait for the lost process until the heartbeat timeout)."""
    fail(
        f"process {jax.process_index()} of {jax.process_count()}: an exchange with the other processes failed "
        f"({orbax_noise.one_line(error)}); if another process died, its output says why; rerun every process "
        "with the same command to resume from the last checkpoint",
        EXIT_LOST_PROCESS,
        alone=True,
    )


def start_distributed(options: dict[str, Any], stop: StopOnSignal) -> None:
    """``jax.distributed.initialize(**options)`` with gloo collectives on CPU and JAX's preemption
    notice on; from then on a stop signal reaches every process (:meth:`StopOnSignal.hand_over`).
    Exits 2 when there is no cluster to detect, 4 when the processes do not all connect within
    ``options['initialization_timeout']`` seconds."""
    if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "none"):  # CPU, several processes
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", True)  # the loop stops all processes through it
    timeout = options["initialization_timeout"]
    # JAX aborts with a C++ stack trace when its own timeout passes: this timer ends the process
    # first, with one line (initialize releases the GIL while it waits for the others).
    watchdog = threading.Timer(timeout, not_connected, (options.get("coordinator_address"), timeout, "timed out"))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**{**options, "initialization_timeout": timeout + INITIALIZATION_MARGIN_S})
    except ValueError as error:
        if "coordinator_address" not in options:
            fail(
                f"--distributed found no cluster to join ({error}): give --coordinator_address, "
                "--num_processes and --process_id"
            )
        fail(str(error))
    except Exception as error:  # jaxlib's errors: the coordinator's address cannot be used
        not_connected(options.get("coordinator_address"), timeout, orbax_noise.one_line(error))
    finally:
        watchdog.cancel()
    stop.hand_over()


def not_connected(address: str | None, timeout: int, why: str) -> NoReturn:
    """One line and exit 4, at once (JAX's shutdown would wait for the missing processes)."""
    fail(
        f"the processes of this run did not all connect to {address or 'the detected coordinator'} within "
        f"--initialization_timeout={timeout} s ({why}); start every process with the same --coordinator_address "
        "and --num_processes, each with its own --process_id, and check that process 0's host and port can be reached",
        EXIT_LOST_PROCESS,
        alone=True,
    )


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
            "Train with several processes (hosts): jax.distributed.initialize() detects them on TPU pods, "
            "SLURM and Open MPI; elsewhere give the three flags below (which imply --distributed).",
            flag_values=flag_values,
        )
        self.coordinator_address = flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0, the same for every process.", flag_values=flag_values
        )
        self.num_processes = flags.DEFINE_integer(
            "num_processes", None, "How many processes train together.", flag_values=flag_values
        )
        self.process_id = flags.DEFINE_integer(
            "process_id", None, "This process's index, 0 to num_processes - 1.", flag_values=flag_values
        )
        self.initialization_timeout = flags.DEFINE_integer(
            "initialization_timeout",
            300,
            "Seconds every process waits for the others to connect (several processes).",
            flag_values=flag_values,
        )
        self.heartbeat_timeout_seconds = flags.DEFINE_integer(
            "heartbeat_timeout_seconds",
            100,
            "Seconds without heartbeats after which a process counts as dead and the others stop (several processes).",
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

    def distributed_options(self) -> dict[str, Any] | None:
        """:func:`distributed_options` of the flags; exit 2 naming a bad one."""
        try:
            return distributed_options(
                self.distributed.value,
                self.coordinator_address.value,
                self.num_processes.value,
                self.process_id.value,
                self.initialization_timeout.value,
                self.heartbeat_timeout_seconds.value,
            )
        except ValueError as error:
            fail(str(error))

    def main(self, argv: list[str]) -> None:
        """Train with the parsed flags; exits 0 done, 1 disk full, 2 a mistake, 3 diverged, 4 lost a process,
        128 + signal."""
        with StopOnSignal() as stop:
            options = self.distributed_options()
            if _EARLY_SIGNALS:
                if options is None:
                    stopped(_EARLY_SIGNALS[0], "while starting; nothing was written")
                stop.record(_EARLY_SIGNALS[0])  # the other processes stop with this one, once connected
            if len(argv) > 1:
                fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
            if options is not None:
                start_distributed(options, stop)
            assert self.config is not None  # defined by parse_flags
            try:
                self.run(self.config.value, self.workdir.value, stop)
            except (RunConfigError, data.DataNotAvailableError) as error:
                fail(str(error))
            except TrainingDiverged as error:
                fail(str(error), EXIT_DIVERGED)
            except Exception as error:
                self.failed(error)

    def failed(self, error: Exception) -> NoReturn:
        """Report an error that may have struck this process alone (disk full, a lost process), or
        re-raise it. Several processes: exit without JAX's shutdown barrier, which would wait for the
        others until its timeout; they stop at their next exchange or missed heartbeat instead."""
        alone = jax.process_count() > 1
        exchange = failed_exchange(error)  # also under a checkpoint write, metrics, predictions, a check
        if exchange is not None:
            lost_process(exchange)
        if isinstance(error, checkpoints.CheckpointWriteError):
            fail(str(error), EXIT_DISK_FULL, alone)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(
                f"disk full writing into {error.filename or self.workdir.value} ({error.strerror}); checkpoints "
                "already written are kept; free space and rerun the same command to resume",
                EXIT_DISK_FULL,
                alone,
            )
        if alone:
            traceback.print_exception(error)
            sys.stderr.flush()
            os._exit(1)
        raise error

    def run(self, config, workdir: str, stop: StopOnSignal) -> None:
        """Check, lock, train (or resume); exits 128 + signal when stopped by one."""
        if self.compilation_cache.value:
            jax.config.update("jax_compilation_cache_dir", self.compilation_cache.value)
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines
        package_logger = logging.getLogger("cka_jax")
        package_logger.setLevel(logging.INFO)
        package_logger.addHandler(logging.StreamHandler(sys.stderr))
        package_logger.propagate = False
        if jax.process_count() > 1:
            package_logger.info(
                "process %d of %d; a process silent for %d s (--heartbeat_timeout_seconds) ends the others with "
                "JAX's 'Terminating process because the JAX distributed service detected fatal errors'",
                jax.process_index(),
                jax.process_count(),
                self.heartbeat_timeout_seconds.value,
            )
        model, layout = check_run(config)
        data.check_data(config.data.name, config.data.data_dir or None)  # its mistakes: before anything is written
        with lock_workdir(workdir):
            check_workdir(workdir, config)
            if stop.is_set():
                stopped(stop.received or signal.SIGTERM, "before training; run the same command to start it")
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
            # several processes: a peer's signal stops this one too, through JAX's preemption notice
            sys.exit(128 + (stop.received or signal.SIGTERM))
        package_logger.info("wrote %s", Workdir(workdir).predictions)


if __name__ == "__main__":
    command = TrainCommand()
    app.run(command.main, flags_parser=command.parse_flags)
