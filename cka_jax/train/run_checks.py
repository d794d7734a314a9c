"""Every check of a run that needs no data and no workdir: config, architecture, layout, memory,
and that a data location it names (``data.data_dir``) exists and is one the data set reads.

:func:`check_run` is what train.py and :func:`~cka_jax.train.loop.train_and_evaluate` call before
anything is written; it gives the model and the population's layout. Shapes only: nothing is run
or compiled.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cka_jax.data import datasets as data
from cka_jax.models import ResNetTrunk
from cka_jax.train import population as pop
from cka_jax.train import step as training
from cka_jax.workdir import config as run_config
from cka_jax.workdir.config import RunConfigError

# int32 step counters (TrainState.step, the schedules) must not wrap.
MAX_TOTAL_STEPS = 2**31 - 1


def check_run(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> tuple[ResNetTrunk, pop.PopulationLayout]:
    """Every check that needs no data: config, the data location given (``data.data_dir``),
    architecture, layout. Returns (model, layout).

    Raises :class:`RunConfigError` with the reason.
    """
    try:
        run_config.validate_config(config)
        _check_data_fields(config)
        model = run_config.build_model(config)
        state = model_state_shape(config, model)  # an invalid architecture fails here
        strategy = run_config.Strategy.parse(config.population.strategy)  # the one place it is read
        layout = pop.make_layout(config.population.size, strategy, devices)
        check_memory(config, model, state, layout)
    except RunConfigError:
        raise
    except (ValueError, TypeError, data.DataNotAvailableError) as error:
        raise RunConfigError(str(error)) from error
    return model, layout


def _check_data_fields(config: ml_collections.ConfigDict) -> None:
    """``ValueError`` for data fields that do not suit the data set."""
    info = data.dataset(config.data.name)
    if info.streamed and not config.population.shared_data_order:
        raise ValueError(
            f"{config.data.name} is streamed from host, so the population "
            "shares its batches: set population.shared_data_order=True"
        )
    if config.data.data_dir and info.source == "scikit-learn":
        raise ValueError(
            f"data.data_dir={config.data.data_dir} is given, but {config.data.name} comes with {info.source} "
            "and reads no data files: leave data.data_dir empty"
        )
    data.check_data_dir(config.data.name, config.data.data_dir)
    side = data.image_shape(config)[0]
    if config.data.crop_padding > side:
        raise ValueError(f"data.crop_padding must be at most the image side ({side}), got {config.data.crop_padding}")


def check_total_steps(config: ml_collections.ConfigDict, total_steps: int) -> None:
    """:class:`RunConfigError` when the run has more steps than a step counter holds."""
    if total_steps > MAX_TOTAL_STEPS:
        raise RunConfigError(
            f"train.epochs={config.train.epochs} makes {total_steps} steps, "
            f"more than a step counter holds ({MAX_TOTAL_STEPS})"
        )


def model_state_shape(config: ml_collections.ConfigDict, model: ResNetTrunk) -> training.TrainState:
    """ShapeDtypeStructs of one model's :class:`~cka_jax.train.step.TrainState` (nothing is run)."""
    tx = training.make_optimizer(config, 1)
    sample = jnp.zeros((1,) + data.image_shape(config), jnp.float32)
    return jax.eval_shape(
        lambda: training.create_train_state(model, tx, jax.random.PRNGKey(0), jax.random.PRNGKey(0), sample)
    )


def memory_per_model(
    config: ml_collections.ConfigDict, model: ResNetTrunk, state: training.TrainState
) -> tuple[int, int]:
    """(bytes of one model's training ``state``, bytes of the activations one model's training
    step keeps), from shapes only: nothing is run or compiled."""
    images = jax.ShapeDtypeStruct((config.train.batch_size,) + data.image_shape(config), jnp.dtype(config.model.dtype))
    _, captured = jax.eval_shape(
        lambda variables, x: model.apply(
            variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
        ),
        state.variables(),
        images,
    )
    # The output of every module of a training step: about what its backward pass keeps (a
    # block's output is counted with its layers' outputs, which covers the activations between
    # them); 22 GB for ImageNet ResNet-50 at batch 128. Evaluation keeps less.
    return _nbytes(state), _nbytes(captured["intermediates"])


def check_memory(
    config: ml_collections.ConfigDict, model: ResNetTrunk, state: training.TrainState, layout: pop.PopulationLayout
) -> None:
    """``ValueError`` (one line) when the population cannot fit in memory, estimated from one
    model's ``state`` (:func:`model_state_shape`) and one chunk's activations. With
    ``population.strategy=auto`` the smallest chunk (one model per call) is checked: the
    measuring skips chunk sizes that do not fit (:mod:`~cka_jax.train.strategy_tuning`)."""
    state_bytes, activation_bytes = memory_per_model(config, model, state)
    if layout.measured:
        layout = layout.with_models_per_call(1)
    pop.check_memory(layout, state_bytes, activation_bytes * layout.models_per_call)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
