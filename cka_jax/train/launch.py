"""train.py's work once its flags are parsed: start the processes, check, lock, train, and end with
one line and the exit status that says how it went.

Exit statuses (:class:`ExitStatus`; 128 + signal when a stop signal ended the run):

    0  DONE          every model trained, predictions written.
    1  DISK_FULL     a checkpoint, metrics.jsonl or the predictions could not be written: one line;
                     earlier checkpoints are kept and the same command resumes from them.
    2  USAGE         a mistake in the command (flag, config file, config value, workdir, a workdir
                     that holds another run or is in use): one line saying what to change; nothing
                     was written.
    3  DIVERGED      a non-finite loss or parameter, or an exploded loss: the message names the
                     models and the step; the last finite checkpoint is kept, no predictions.
    4  LOST_PROCESS  several processes: one did not connect within --initialization_timeout, or an
                     exchange with another one failed (it died); one line.
    128 + signal     stopped by SIGTERM (143), SIGINT (130) or SIGHUP (129), at any time from start-up
                     on; what was trained is checkpointed and the same command resumes. Several
                     processes all stop at the same step: a stop signal to any one stops every one,
                     and each exits 143 (130 or 129 the process that got a SIGINT or SIGHUP).
    134              several processes: another one sent no heartbeat for --heartbeat_timeout_seconds
                     (it died or hangs); JAX aborts this one with its own message.

Several processes train one population when each runs the same command with
``jax.distributed.initialize``'s options (:func:`distributed_options`); :func:`start_distributed`
connects them with gloo collectives on CPU and routes every stop signal through JAX's preemption
notice, so that all of them stop at the same step (:mod:`~cka_jax.train.stop_signal`).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import ml_collections
from absl import flags
from absl import logging as absl_logging
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cka_jax.data import datasets as data
from cka_jax.train import checkpoints, loop
from cka_jax.train.health import TrainingDiverged
from cka_jax.train.population import failed_exchange
from cka_jax.train.run_checks import check_run
from cka_jax.train.stop_signal import StopOnSignal
from cka_jax.train.workdir_checks import check_workdir, lock_workdir
from cka_jax.workdir import Workdir, orbax_noise
from cka_jax.workdir.config import RunConfigError

# Seconds JAX waits for the processes to connect beyond --initialization_timeout: the one-line
# error at --initialization_timeout comes first.
INITIALIZATION_MARGIN_S = 10
PROGRAM = "train.py"


class ExitStatus(enum.IntEnum):
    """How a run ended; the table in this module's docstring says what each one means."""

    DONE = 0
    DISK_FULL = 1
    USAGE = 2
    DIVERGED = 3
    LOST_PROCESS = 4


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """train.py's flags besides the config: where to write, and how the processes meet.

    ``distributed`` is ``jax.distributed.initialize``'s keyword arguments, None for one process
    (:func:`distributed_options`); ``stop_signals`` are signals received before the run handled them.
    """

    workdir: str
    compilation_cache: str = ""
    distributed: dict[str, Any] | None = None
    heartbeat_timeout_seconds: int = 100
    stop_signals: Sequence[int] = ()


def fail(message: str, status: int = ExitStatus.USAGE, alone: bool = False) -> NoReturn:
    """Exit with ``status`` after one line on stderr; ``alone``: at once, without JAX's shutdown
    barrier (an error of this process only, when several train together)."""
    print(f"{PROGRAM}: error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    if alone:
        os._exit(status)
    sys.exit(status)


def stopped(signum: int, what: str) -> NoReturn:
    """Exit with 128 + ``signum`` after saying what the signal stopped."""
    print(f"{PROGRAM}: stopped by signal {signum} {what}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def config_flag_error(error: Exception) -> str:
    """One line for a mistake ml_collections found in --config (the file, its ``:arg``) or in a
    --config.<field> override (an unknown field, a value of the wrong type)."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    missing = re.search(r"No such file or directory: '([^']*)'", text)
    if missing:
        return f"config file {missing.group(1)!r} does not exist"
    if "has no attribute 'get_config'" in text:
        return "the config file defines no get_config() function"
    if isinstance(error, (KeyError, AttributeError)):
        # ml_collections names an unknown field alone on the first line ('depht'), or as a locked
        # ConfigDict's Key "depht" does not exist; any other message is the config file's own error.
        locked = re.search(r'Key "([\w.]+)" does not exist', text)
        first = text.splitlines()[0].strip("'\" ") if text else ""
        field = locked.group(1) if locked else first if re.fullmatch(r"[\w.]+", first) else None
        if field:
            suggestion = re.search(r'Did you mean "([^"]*)"', text)
            hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
            return f"unknown config field {field!r}{hint}"
    if "Traceback" in text:  # an error raised by the config file's get_config, e.g. for a bad :arg
        return "config file: " + [line for line in text.splitlines() if line.strip()][-1]
    if isinstance(error, flags.Error):
        return text
    return f"config file: {type(error).__name__}: {text}"


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
        ExitStatus.LOST_PROCESS,
        alone=True,
    )


def not_connected(address: str | None, timeout: int, why: str) -> NoReturn:
    """One line and exit 4, at once (JAX's shutdown would wait for the missing processes)."""
    fail(
        f"the processes of this run did not all connect to {address or 'the detected coordinator'} within "
        f"--initialization_timeout={timeout} s ({why}); start every process with the same --coordinator_address "
        "and --num_processes, each with its own --process_id, and check that process 0's host and port can be reached",
        ExitStatus.LOST_PROCESS,
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


def report_failure(error: Exception, workdir: str) -> NoReturn:
    """Report an error that may have struck this process alone (disk full, a lost process), or
    re-raise it. Several processes: exit without JAX's shutdown barrier, which would wait for the
    others until its timeout; they stop at their next exchange or missed heartbeat instead."""
    alone = jax.process_count() > 1
    exchange = failed_exchange(error)  # also under a checkpoint write, metrics, predictions, a check
    if exchange is not None:
        lost_process(exchange)
    if isinstance(error, checkpoints.CheckpointWriteError):
        fail(str(error), ExitStatus.DISK_FULL, alone)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        fail(
            f"disk full writing into {error.filename or workdir} ({error.strerror}); checkpoints "
            "already written are kept; free space and rerun the same command to resume",
            ExitStatus.DISK_FULL,
            alone,
        )
    if alone:
        traceback.print_exception(error)
        sys.stderr.flush()
        os._exit(1)
    raise error


def run(config: ml_collections.ConfigDict, options: RunOptions) -> None:
    """Connect the processes (if several), check, lock and train ``config`` into ``options.workdir``;
    exits with the :class:`ExitStatus` (or 128 + signal) of anything but a finished run."""
    with StopOnSignal() as stop:
        if options.stop_signals:
            if options.distributed is None:
                stopped(options.stop_signals[0], "while starting; nothing was written")
            stop.record(options.stop_signals[0])  # the other processes stop with this one, once connected
        if options.distributed is not None:
            start_distributed(options.distributed, stop)
        try:
            _train(config, options, stop)
        except (RunConfigError, data.DataNotAvailableError) as error:
            fail(str(error))
        except TrainingDiverged as error:
            fail(str(error), ExitStatus.DIVERGED)
        except Exception as error:
            report_failure(error, options.workdir)


def _package_logger(options: RunOptions) -> logging.Logger:
    """cka_jax's log lines on stderr (orbax's per-save INFO lines off)."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("cka_jax")
    logger.setLevel(logging.INFO)
    logger.handlers = [logging.StreamHandler(sys.stderr)]  # once, however often a process runs this
    logger.propagate = False
    if jax.process_count() > 1:
        logger.info(
            "process %d of %d; a process silent for %d s (--heartbeat_timeout_seconds) ends the others with "
            "JAX's 'Terminating process because the JAX distributed service detected fatal errors'",
            jax.process_index(),
            jax.process_count(),
            options.heartbeat_timeout_seconds,
        )
    return logger


def _train(config: ml_collections.ConfigDict, options: RunOptions, stop: StopOnSignal) -> None:
    """Check, lock, train (or resume); exits 128 + signal when stopped by one."""
    if options.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", options.compilation_cache)
    logger = _package_logger(options)
    workdir = options.workdir
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
        with logging_redirect_tqdm([logger]), bar:
            result = loop.train_checked(config, workdir, model, layout, progress=bar, should_stop=stop.is_set)
    if result.interrupted:
        logger.info("interrupted at step %d of %d; run the same command to resume", result.step, result.total_steps)
        # several processes: a peer's signal stops this one too, through JAX's preemption notice
        sys.exit(128 + (stop.received or signal.SIGTERM))
    logger.info("wrote %s", Workdir(workdir).predictions)
