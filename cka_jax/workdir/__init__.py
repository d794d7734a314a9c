"""The run directory that training writes and analysis reads: the one place that names its files.

    <workdir>/
        config.json              the run's config (flat JSON); a second copy in checkpoints/
        checkpoints/<step>/      orbax checkpoints of the whole population (SHA-256 manifest inside;
                                 read back, verified, by `checkpoints` and `trained`)
        checkpoints/config.json  the config copy that travels with the checkpoints
        metrics.jsonl            one strict-JSON row per (epoch, model); see `metrics_log`
        predictions/test.npz     test logits (M, N, C) and labels (N,), written when training ends
        population_strategy.json the chunk size population.strategy=auto measured, and the timings
        .lock                    held (flock) by the one process writing the run; see `lock`
        analysis/                analyze.py's default output directory

Writing goes through `cka_jax._atomic_file.write` (a file appears whole or not at all), the lock through
`lock.acquire`, metrics through `metrics_log`, the two config copies through `config_copies`
(read back and compared there too). Reading a trained run: `trained` (its config and its
population's variables), on `checkpoints` (verified against `checkpoint_manifest`; orbax's noise
dropped by `orbax_noise`). Only the standard library is imported here; the submodules that need
orbax or flax are imported on their own.
"""

from __future__ import annotations

import dataclasses
import os

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
PREDICTIONS_DIR = "predictions"
PREDICTIONS = os.path.join(PREDICTIONS_DIR, "test.npz")
LOCK = ".lock"
POPULATION_STRATEGY = "population_strategy.json"
ANALYSIS = "analysis"
# The run's config is kept twice, beside the outputs and with the checkpoints: deleting one copy
# never lets a run with another config resume (or set aside) these checkpoints.
CONFIG_COPIES = (CONFIG, os.path.join(CHECKPOINTS, CONFIG))


def checkpoint_steps(directory: str) -> list[int]:
    """Steps of the committed checkpoints under a checkpoint ``directory``, ascending, as on disk
    now; [] when there is none (or no directory).

    orbax commits a checkpoint by renaming its temporary directory to ``<step>``, and drops one by
    renaming it away: a ``<step>`` directory is a whole checkpoint.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths of the files in one run directory (nothing is created here; only
    :meth:`checkpoint_steps` reads, a directory listing)."""

    root: str

    def _join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def config(self) -> str:
        return self._join(CONFIG)

    @property
    def checkpoints(self) -> str:
        return self._join(CHECKPOINTS)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints kept in this workdir, ascending (:func:`checkpoint_steps`)."""
        return checkpoint_steps(self.checkpoints)

    @property
    def checkpoint_config(self) -> str:
        """The config copy kept beside the checkpoints."""
        return self._join(CHECKPOINTS, CONFIG)

    @property
    def config_copies(self) -> tuple[str, str]:
        """Paths of :data:`CONFIG_COPIES`, in that order."""
        return (self.config, self.checkpoint_config)

    @property
    def metrics(self) -> str:
        return self._join(METRICS)

    @property
    def predictions(self) -> str:
        return self._join(PREDICTIONS)

    @property
    def predictions_dir(self) -> str:
        return self._join(PREDICTIONS_DIR)

    @property
    def population_strategy(self) -> str:
        """What ``population.strategy=auto`` measured and chose (cka_jax.train.strategy_tuning)."""
        return self._join(POPULATION_STRATEGY)

    @property
    def lock(self) -> str:
        return self._join(LOCK)

    @property
    def analysis(self) -> str:
        return self._join(ANALYSIS)
