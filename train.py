r"""Train a population of M seeds of one ResNet on every device, resumable from its workdir.

  python train.py                                   # digits default (configs/digits.py) → workdir/default
  python train.py --config configs/cifar10.py:depth=62,width=1,size=10 --workdir workdir/c10_r62
  python train.py --config configs/cifar10.py --config.model.width=4 --config.population.size=8 \
      --workdir workdir/c10_r14_w4
  python train.py --config configs/paper_pairs.py:wide --workdir workdir/pairs_wide

Any config field can be overridden with --config.<field>=<value>. Re-running the same command
resumes from the workdir's latest checkpoint; SIGTERM/SIGINT checkpoint and stop (exit code
128 + signal). Outputs: config.json, checkpoints/, metrics.jsonl, predictions/test.npz.
"""
import logging
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cka_jax import checkpoints, data, run_config, trainer

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py")


def reject_unknown_overrides(argv: list[str]) -> None:
    """Exit with a plain message for --config.<field> overrides of fields that do not exist."""
    known = set(run_config.flat_config(run_config.base_config()))
    for arg in argv[1:]:
        if arg.startswith("--config."):
            field = arg[len("--config."):].split("=", 1)[0]
            if field not in known and not any(k.startswith(field + ".") for k in known):
                sys.exit(f"train.py: error: unknown config field '{field}' in {arg}")


reject_unknown_overrides(sys.argv)  # config_flags reads the overrides as it is defined
_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file (optionally `path.py:arg`).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/default", "Run directory (created; resumed).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.path.expanduser("~/.cache/cka_jax/xla"),
    "Directory of JAX's persistent compilation cache (resumed runs skip compiling); '' disables.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host, e.g. TPU pods).")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"train.py: error: {error}\nPass --help for usage.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _COMPILATION_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax's per-save INFO lines
    package_logger = logging.getLogger("cka_jax")
    package_logger.setLevel(logging.INFO)
    package_logger.addHandler(logging.StreamHandler(sys.stderr))
    package_logger.propagate = False
    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        trainer.check_run(config)
        trainer.check_workdir(workdir, config)
    except trainer.RunConfigError as error:
        sys.exit(f"train.py: error: {error}")
    bar = tqdm(total=config.train.epochs, unit="epoch", desc=os.path.basename(workdir.rstrip("/")),
               disable=jax.process_index() != 0)
    try:
        with checkpoints.StopOnSignal() as stop, logging_redirect_tqdm([package_logger]), bar:
            result = trainer.train_and_evaluate(config, workdir, progress=bar,
                                                should_stop=stop.is_set)
    except data.DataNotAvailableError as error:
        sys.exit(f"train.py: error: {error}")
    if result.interrupted:
        package_logger.info("interrupted at step %d of %d; run the same command to resume",
                            result.step, result.total_steps)
        sys.exit(128 + (stop.received or 0))
    package_logger.info("wrote %s", os.path.join(workdir, "predictions", "test.npz"))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
