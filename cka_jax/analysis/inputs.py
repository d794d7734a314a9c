"""Trained workdirs as analysis inputs: the restored population, its test set and predictions.

A workdir is what `train.py` writes (see `cka_jax.workdir`): config.json, checkpoints/,
predictions/test.npz. Populations of in-memory data sets are analysed on their test images;
streamed ones (ImageNet) from their predictions alone, without restoring the models. Every
problem with the inputs raises `AnalysisInputError` naming the workdir and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from cka_jax.analysis.errors import AnalysisInputError
from cka_jax.data import datasets as data_lib
from cka_jax.models import ResNetTrunk, representation_shapes
from cka_jax.workdir import CHECKPOINTS, CONFIG, PREDICTIONS, Workdir, checkpoints, trained
from cka_jax.workdir.config import build_model

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TestSet:
    """The held-out examples a population is analysed on; images, mean and std are None when only
    the predictions are analysed (streamed data sets)."""

    images: np.ndarray | None  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int
    mean: np.ndarray | None  # (C,) float32 normalisation of the training set
    std: np.ndarray | None  # (C,)
    num_classes: int
    dataset: str

    def in_memory_images(self) -> np.ndarray:
        """The images (N, H, W, C); only analyses that need them (`Analysis.needs_images`) ask,
        and they run only on a test set held in memory."""
        if self.images is None:
            raise AnalysisInputError(f"{self.dataset!r} is streamed: its test images are not held in memory")
        return self.images


@dataclasses.dataclass(frozen=True)
class TrainedPopulation:
    """The population of models trained in `workdir`, restored from one of its checkpoints.

    variables: {'params', 'batch_stats'} stacked on a leading model axis (M, ...), or None when
    the population was not restored (analyses of its predictions only).
    """

    name: str
    workdir: str
    config: ml_collections.ConfigDict
    model: ResNetTrunk
    variables: PyTree | None
    step: int

    @property
    def size(self) -> int:
        if self.variables is None:
            return int(self.config.population.size)
        return int(jax.tree.leaves(self.variables)[0].shape[0])

    def subset(self, models: slice | np.ndarray) -> TrainedPopulation:
        """The same population restricted to `models` (indices or a slice of the model axis)."""
        return dataclasses.replace(self, variables=jax.tree.map(lambda v: v[models], self.variables))

    @property
    def architecture(self) -> str:
        """e.g. 'ResNet-14 2×', 'ResNet-38 1× no-res', with ' random labels' for memorising runs."""
        label = self.model.architecture()
        if not self.config.model.residual:
            label += " no-res"
        if self.config.data.random_labels:
            label += " random labels"
        return label

    def describe(self) -> str:
        """e.g. 'ResNet-14 1×, 4 seeds, digits, 0.25 of the training data'."""
        fraction = self.config.data.fraction
        extra = [f"{fraction:g} of the training data"] if fraction < 1 else []
        return ", ".join([self.architecture, f"{self.size} seeds", self.config.data.name] + extra)


def population_name(workdir: str) -> str:
    return os.path.basename(os.path.normpath(workdir))


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the checkpoints kept in `workdir`, ascending; [] when there are none."""
    return Workdir(workdir).checkpoint_steps()


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config `workdir` was trained with; AnalysisInputError if it is missing or damaged."""
    try:
        return trained.load_config(workdir)
    except FileNotFoundError as error:
        raise AnalysisInputError(f"workdir {workdir!r} has no {CONFIG}: it is not a train.py workdir") from error
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise AnalysisInputError(f"the config of workdir {workdir!r} cannot be used: {error}") from error


def check_workdir(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config of `workdir`; AnalysisInputError unless `workdir` holds a train.py run with a
    readable config and a checkpoint (at `step`)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise AnalysisInputError(
            f"workdir {workdir!r} is a file, not a directory: pass the directory train.py wrote (--workdir of train.py)"
        )
    if not os.path.isdir(workdir):
        raise AnalysisInputError(
            f"workdir {workdir!r} does not exist; train it first with `python train.py --workdir {workdir}`"
        )
    config = load_config(workdir)
    steps = checkpoint_steps(workdir)
    if not steps:
        raise AnalysisInputError(
            f"workdir {workdir!r} has no checkpoint under {CHECKPOINTS}/; train it "
            f"(or let the interrupted run finish) with `python train.py --workdir "
            f"{workdir}` first"
        )
    if step is not None and step not in steps:
        raise AnalysisInputError(f"workdir {workdir!r} has no checkpoint at step {step}; kept steps: {steps}")
    return config


def load_population(
    workdir: str, step: int | None = None, name: str | None = None, restore: bool = True
) -> TrainedPopulation:
    """The population trained in `workdir`, at `step` (default: its latest checkpoint); with
    restore=False its variables are left on disk (for analyses of its predictions)."""
    config = check_workdir(workdir, step)
    name = name or population_name(workdir)
    if not restore:
        step = checkpoint_steps(workdir)[-1] if step is None else step
        return TrainedPopulation(name, workdir, config, build_model(config), None, step)
    try:
        config, model, variables, step = trained.load_trained_population(workdir, step)
    except checkpoints.DamagedCheckpointError as error:
        raise AnalysisInputError(
            f"{error}; run `python train.py --workdir {workdir}` with its config "
            "to set it aside and resume from the checkpoint before it"
        ) from error
    except checkpoints.CheckpointError as error:
        raise AnalysisInputError(str(error)) from error
    return TrainedPopulation(name, workdir, config, model, variables, step)


def widest_block_output(population: TrainedPopulation) -> int:
    """Channels of the widest block output (or stem) of `population`'s architecture."""
    shapes = representation_shapes(population.model, (1,) + data_lib.image_shape(population.config), "blocks")
    return max(s.shape[-1] for s in shapes.values())


def _in_memory_names() -> list[str]:
    return [name for name, info in data_lib.DATASETS.items() if not info.streamed]


def has_test_images(config: ml_collections.ConfigDict) -> bool:
    """Whether analyses can hold the test images of `config`'s data set in memory (not streamed)."""
    return not data_lib.dataset(config.data.name).streamed


def load_test_set(config: ml_collections.ConfigDict) -> TestSet:
    """The test split of the data set a population was trained on (never subset or relabelled)."""
    if not has_test_images(config):
        raise AnalysisInputError(
            f"{config.data.name!r} is streamed: analyses of its representations need an in-memory test set "
            f"({', '.join(_in_memory_names())}); its populations are analysed from their predictions"
        )
    data = data_lib.load_in_memory(config.data.name, 1.0, config.data.seed, False, config.data.data_dir or None)
    return TestSet(data.test_images, data.test_labels, data.mean, data.std, data.num_classes, config.data.name)


def load_train_set(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """The full, correctly labelled training split: images (N, H, W, C) uint8, labels (N,)."""
    data = data_lib.load_in_memory(config.data.name, 1.0, config.data.seed, False, config.data.data_dir or None)
    return data.train_images, data.train_labels


def _predictions_path(workdir: str) -> str:
    path = Workdir(workdir).predictions
    if not os.path.exists(path):
        raise AnalysisInputError(
            f"workdir {workdir!r} has no {PREDICTIONS}: its training has not "
            f"finished; run `python train.py --workdir {workdir}` to finish it"
        )
    return path


def _unreadable(workdir: str, path: str, error: Exception) -> AnalysisInputError:
    return AnalysisInputError(
        f"{path} cannot be read ({type(error).__name__}: {error}); delete it and run "
        f"`python train.py --workdir {workdir}` to write it again from the final checkpoint"
    )


_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def _check_labels(path: str, labels: np.ndarray, num_classes: int | None) -> np.ndarray:
    """`labels` if they are (N,) integer class indices (in [0, num_classes) when given), else
    AnalysisInputError."""
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
        raise AnalysisInputError(
            f"{path}: labels must be a non-empty (N,) integer array, got {labels.dtype} "
            f"{labels.shape}; delete it and rerun train.py to rewrite it"
        )
    high = num_classes if num_classes is not None else np.inf
    if labels.min() < 0 or labels.max() >= high:
        raise AnalysisInputError(
            f"{path}: labels lie in [{labels.min()}, {labels.max()}], outside the "
            f"{num_classes} classes [0, {high - 1}] of the data set; delete it and rerun "
            "train.py to rewrite it"
        )
    return labels


def load_labels(workdir: str, num_classes: int | None = None) -> np.ndarray:
    """The test labels (N,) of predictions/test.npz, without reading the logits; AnalysisInputError
    unless they are integer class indices (below `num_classes` when given)."""
    path = _predictions_path(workdir)
    try:
        with np.load(path) as f:
            labels = f["labels"]
    except _READ_ERRORS as error:
        raise _unreadable(workdir, path, error) from error
    return _check_labels(path, labels, num_classes)


def _logits_header(
    path: str, member, num_labels: int, num_classes: int | None, num_models: int | None
) -> tuple[tuple[int, ...], np.dtype]:
    """Shape (M, N, C) and dtype of the logits.npy `member`, checked against the labels, the data
    set's classes and the population size (when given)."""
    version = np.lib.format.read_magic(member)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = header(member)
    if len(shape) != 3 or shape[1] != num_labels or fortran_order or 0 in shape:
        raise AnalysisInputError(
            f"{path}: logits of shape {shape} (fortran order {fortran_order}) do "
            f"not match {num_labels} labels; expected C-ordered (M, N, C)"
        )
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise AnalysisInputError(f"{path}: logits of dtype {dtype}; expected float16, float32 or float64")
    if num_classes is not None and shape[2] != num_classes:
        raise AnalysisInputError(f"{path}: logits over {shape[2]} classes, but the data set has {num_classes}")
    if num_models is not None and shape[0] != num_models:
        raise AnalysisInputError(f"{path}: logits of {shape[0]} models, but the population has {num_models}")
    return shape, dtype


def load_correct(
    workdir: str, num_classes: int | None = None, num_models: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Whether each model classifies each test example correctly, (M, N) bool, and the labels (N,),
    from predictions/test.npz read one model's logits at a time (ImageNet: 50k x 1000 per model).

    AnalysisInputError for logits that are not float (M, N, C) over the labels, non-finite, over
    another number of classes than `num_classes` or models than `num_models` (when given), and for
    labels outside the classes.
    """
    path = _predictions_path(workdir)
    try:
        with np.load(path) as f, f.zip.open("logits.npy") as member:
            labels = _check_labels(path, f["labels"], num_classes)
            shape, dtype = _logits_header(path, member, len(labels), num_classes, num_models)
            if num_classes is None and labels.max() >= shape[2]:
                raise AnalysisInputError(
                    f"{path}: label {labels.max()} is not one of the {shape[2]} classes of the logits"
                )
            correct = np.empty(shape[:2], bool)
            for m in range(shape[0]):
                logits = np.frombuffer(member.read(shape[1] * shape[2] * dtype.itemsize), dtype)
                logits = logits.reshape(shape[1:])
                if not np.isfinite(logits).all():
                    raise AnalysisInputError(
                        f"{path}: the logits of model {m} are not all finite (NaN or inf): "
                        "its training diverged or the file is damaged; delete it and rerun "
                        "train.py to rewrite it from the final checkpoint"
                    )
                correct[m] = logits.argmax(-1) == labels
    except AnalysisInputError:
        raise
    except _READ_ERRORS as error:
        raise _unreadable(workdir, path, error) from error
    return correct, labels


def load_test_labels(workdir: str, config: ml_collections.ConfigDict) -> TestSet:
    """The test set of `workdir` as its predictions know it: labels and number of classes, no images."""
    num_classes = data_lib.dataset(config.data.name).num_classes
    return TestSet(None, load_labels(workdir, num_classes), None, None, num_classes, config.data.name)


def class_names(config: ml_collections.ConfigDict, num_classes: int) -> list[str]:
    """Names of the classes of `config`'s data set (see `DatasetInfo.class_names`)."""
    names = data_lib.dataset(config.data.name).class_names(config.data.data_dir or None)
    return names if len(names) == num_classes else [str(c) for c in range(num_classes)]


def check_comparable(workdirs: Sequence[str], configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises AnalysisInputError unless all runs were trained and tested on the same data set
    (same data.name and data.data_dir)."""
    for workdir, config in zip(workdirs[1:], configs[1:], strict=True):
        for field in ("name", "data_dir"):
            a, b = configs[0].data[field], config.data[field]
            if a != b:
                raise AnalysisInputError(
                    f"populations are not comparable: {workdirs[0]!r} has data.{field}={a!r} but {workdir!r} "
                    f"has data.{field}={b!r}; compare populations tested on the same test set"
                )
