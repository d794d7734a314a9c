"""A trained workdir read back (for analyses): its config and its population's variables."""

from __future__ import annotations

import os

import jax
import ml_collections

from cka_jax.models import ResNetTrunk
from cka_jax.train import checkpoints as ckpt_lib
from cka_jax.train.run_checks import model_state_shape
from cka_jax.train.workdir_checks import saved_configs
from cka_jax.workdir import CONFIG_COPIES, Workdir
from cka_jax.workdir import config as run_config
from cka_jax.workdir.config import RunConfigError


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with: its config.json, or the copy with its checkpoints.

    Raises ``FileNotFoundError`` if there is neither, :class:`~cka_jax.workdir.config.RunConfigError`
    if one is damaged or the two differ.
    """
    copies = saved_configs(workdir)
    if not copies:
        raise FileNotFoundError(f"workdir {workdir} has no {' or '.join(CONFIG_COPIES)}: it holds no train.py run")
    first, *others = copies.values()
    if any(run_config.config_differences(first, run_config.config_from_flat(o)) for o in others):
        paths = " and ".join(os.path.join(workdir, name) for name in CONFIG_COPIES)
        raise RunConfigError(f"{paths} differ: restore the run's config into both")
    return run_config.config_from_flat(first)


def load_trained_population(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, ResNetTrunk, dict, int]:
    """Restore a workdir's population for analysis, on the default device.

    Returns ``(config, model, variables, step)`` with ``variables = {'params', 'batch_stats'}``
    stacked on a leading model axis of size ``population.size`` (padding dropped); ``step``
    defaults to the latest checkpoint (see ``checkpoint.keep_at_fractions`` for others). The
    checkpoint is verified against its checksums; a training still running on ``workdir`` may
    write and delete checkpoints meanwhile. Raises
    :class:`~cka_jax.train.checkpoints.DamagedCheckpointError` or
    :class:`~cka_jax.train.checkpoints.CheckpointGoneError` (see
    :meth:`~cka_jax.train.checkpoints.PopulationCheckpoints.read`).
    """
    config = load_config(workdir)
    model = run_config.build_model(config)
    one = model_state_shape(config, model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract_for(padded: int | None):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((padded or config.population.size,) + a.shape, a.dtype, sharding=device),
            one,
        )

    checkpoints = ckpt_lib.PopulationCheckpoints(Workdir(workdir).checkpoints, read_only=True)
    try:
        step, state = checkpoints.read(abstract_for, step)
    finally:
        checkpoints.close()
    size = config.population.size
    variables = jax.tree.map(lambda x: x[:size], state.variables())
    return config, model, variables, step
