"""A trained workdir read back (for analyses): its config and its population's variables.

Only the parameters and BatchNorm statistics (and each model's step, which verifies that a
checkpoint is the state of the step its directory names) are restored; their shapes come from the
model itself, so reading needs neither the optimizer nor anything else of training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cka_jax.data import datasets as data
from cka_jax.models import ResNetTrunk
from cka_jax.workdir import Workdir
from cka_jax.workdir import config as run_config
from cka_jax.workdir.checkpoints import VerifiedCheckpoints
from cka_jax.workdir.config_copies import load_config

__all__ = ["VARIABLES", "load_config", "load_trained_population", "variables_shape"]

# The fields of a saved population state that analyses read.
VARIABLES = ("params", "batch_stats")


def variables_shape(config: ml_collections.ConfigDict, model: ResNetTrunk) -> dict[str, Any]:
    """ShapeDtypeStructs of one model's ``{'params', 'batch_stats'}`` (nothing is run)."""
    sample = jnp.zeros((1,) + data.image_shape(config), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), sample))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_trained_population(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, ResNetTrunk, dict, int]:
    """Restore a workdir's population for analysis, on the default device.

    Returns ``(config, model, variables, step)`` with ``variables = {'params', 'batch_stats'}``
    stacked on a leading model axis of size ``population.size`` (padding dropped); ``step``
    defaults to the latest checkpoint (see ``checkpoint.keep_at_fractions`` for others). The
    checkpoint is verified against its checksums; a training still running on ``workdir`` may
    write and delete checkpoints meanwhile. Raises
    :class:`~cka_jax.workdir.checkpoints.DamagedCheckpointError` or
    :class:`~cka_jax.workdir.checkpoints.CheckpointGoneError` (see
    :meth:`~cka_jax.workdir.checkpoints.VerifiedCheckpoints.read`).
    """
    config = load_config(workdir)
    model = run_config.build_model(config)
    one = {"step": jax.ShapeDtypeStruct((), jnp.int32), **variables_shape(config, model)}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract_for(padded: int | None):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((padded or config.population.size,) + a.shape, a.dtype, sharding=device),
            one,
        )

    checkpoints = VerifiedCheckpoints(Workdir(workdir).checkpoints)
    try:
        step, state = checkpoints.read(abstract_for, step)
    finally:
        checkpoints.close()
    size = config.population.size
    variables = {name: jax.tree.map(lambda x: x[:size], state.get(name, {})) for name in VARIABLES}
    return config, model, variables, step
