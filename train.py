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

Exit status: 0 done, 1 disk full, 2 a mistake in the command (one line; nothing written),
3 diverged, 4 a process lost, 128 + signal stopped (and resumable); cka_jax/train/launch.py's
table says more.
"""

import gc
import os
import signal

from absl import app, flags
from ml_collections import ConfigDict, config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Run directory (created; resumed).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.path.expanduser("~/.cache/cka_jax/xla"),
    "Directory of JAX's persistent compilation cache (resumed runs skip compiling); '' disables.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Train with several processes (hosts): jax.distributed.initialize() detects them on TPU pods, "
    "SLURM and Open MPI; elsewhere give the three flags below (which imply --distributed).",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, the same for all.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "How many processes train together.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds every process waits for the others to connect (several processes)."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,
    "Seconds without heartbeats after which a process counts as dead and the others stop (several processes).",
)
_stop_signals: list[int] = []  # received while starting, before the run handles them itself


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags, and --config: a config file whose locked ConfigDict takes --config.<field>
    overrides (ml_collections refuses unknown fields and wrong types). A mistake: one line, exit 2."""
    try:
        config = config_flags.DEFINE_config_file(
            "config", DEFAULT_CONFIG, "Config file (optionally `path.py:arg`).", lock_config=True, sys_argv=argv
        )
        rest = flags.FLAGS(argv)
        if not isinstance(config.value, ConfigDict):
            getattr(config.value, "keys", None)  # a file that failed to load raises its error here
            raise TypeError(f"get_config() returned {type(config.value).__name__}, not a ConfigDict")
        return rest
    except Exception as error:  # the config file is user code: any error in it is the user's to fix
        from cka_jax.train import launch  # imports jax: only now, with stop signals already held

        launch.fail(launch.config_flag_error(error) + " (pass --help for usage)")


def main(argv: list[str]) -> None:
    from cka_jax.train import launch  # imports jax: only now, with stop signals already held

    if len(argv) > 1:
        launch.fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    try:
        distributed = launch.distributed_options(
            _DISTRIBUTED.value,
            _COORDINATOR_ADDRESS.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            _INITIALIZATION_TIMEOUT.value,
            _HEARTBEAT_TIMEOUT.value,
        )
    except ValueError as error:
        launch.fail(str(error))
    options = launch.RunOptions(
        _WORKDIR.value, _COMPILATION_CACHE.value, distributed, _HEARTBEAT_TIMEOUT.value, tuple(_stop_signals)
    )
    launch.run(flags.FLAGS.config, options)


if __name__ == "__main__":
    for _signal in STOP_SIGNALS:  # until the run handles them: jax takes seconds to import
        signal.signal(_signal, lambda signum, frame: _stop_signals.append(signum))
    try:
        app.run(main, flags_parser=parse_flags)  # always ends with SystemExit
    finally:
        # The process ends now, its files written and closed: JAX's exit handlers still run (with
        # several processes, the shutdown barrier), but the interpreter's last garbage collections
        # skip the objects that jax, flax, orbax and scipy left: 1-2 s of CPU per process otherwise.
        gc.freeze()
