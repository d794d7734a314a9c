"""Trained workdirs as analysis inputs: the restored population, its test set and predictions.

A workdir is what `train.py` writes (see `cka_jax.trainer`): config.json, checkpoints/,
predictions/test.npz. Every problem with the inputs raises `AnalysisInputError` naming the
workdir and what is wrong.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from cka_jax import data as data_lib
from cka_jax import trainer
from cka_jax.models import ResNetTrunk

PyTree = Any


class AnalysisInputError(ValueError):
    """A workdir, a set of workdirs or an analysis request that cannot be analysed."""


@dataclasses.dataclass(frozen=True)
class TestSet:
    """The held-out images a population is analysed on."""
    images: np.ndarray   # (N, H, W, C) uint8
    labels: np.ndarray   # (N,) int32
    mean: np.ndarray     # (C,) float32 normalisation of the training set
    std: np.ndarray      # (C,)
    num_classes: int
    dataset: str


@dataclasses.dataclass(frozen=True)
class Population:
    """A trained population restored from `workdir`.

    variables: {'params', 'batch_stats'} stacked on a leading model axis (M, ...).
    """
    name: str
    workdir: str
    config: ml_collections.ConfigDict
    model: ResNetTrunk
    variables: PyTree
    step: int

    @property
    def size(self) -> int:
        return int(jax.tree.leaves(self.variables)[0].shape[0])

    def subset(self, models: slice | np.ndarray) -> "Population":
        """The same population restricted to `models` (indices or a slice of the model axis)."""
        return dataclasses.replace(self, variables=jax.tree.map(lambda v: v[models], self.variables))

    @property
    def architecture(self) -> str:
        """e.g. 'ResNet-14 2×', 'ResNet-38 1× no-res', with ' random labels' for memorising runs."""
        m = self.config.model
        label = (f"ResNet-{m.depth} {m.width:g}×" if m.name == "cifar_resnet"
                 else f"ResNet stages {'-'.join(map(str, m.stage_sizes))} widths {'-'.join(map(str, m.stage_widths))}")
        if not m.residual:
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
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def check_workdir(workdir: str, step: int | None = None) -> None:
    """Raises AnalysisInputError unless `workdir` holds a train.py run with a checkpoint (at `step`)."""
    if not os.path.isdir(workdir):
        raise AnalysisInputError(f"workdir {workdir!r} does not exist; train it first with "
                                 f"`python train.py --workdir {workdir}`")
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise AnalysisInputError(f"workdir {workdir!r} has no config.json: it is not a train.py workdir")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise AnalysisInputError(f"workdir {workdir!r} has no checkpoint under checkpoints/; train it "
                                 f"(or let the interrupted run finish) with `python train.py --workdir "
                                 f"{workdir}` first")
    if step is not None and step not in steps:
        raise AnalysisInputError(f"workdir {workdir!r} has no checkpoint at step {step}; kept steps: {steps}")


def load_population(workdir: str, step: int | None = None, name: str | None = None) -> Population:
    """The population trained in `workdir`, at `step` (default: its latest checkpoint)."""
    check_workdir(workdir, step)
    config, model, variables, step = trainer.load_trained_population(workdir, step)
    return Population(name or population_name(workdir), workdir, config, model, variables, step)


def load_test_set(config: ml_collections.ConfigDict) -> TestSet:
    """The test split of the data set a population was trained on (never subset or relabelled)."""
    if config.data.name not in data_lib.IN_MEMORY_DATASETS:
        raise AnalysisInputError(
            f"analysing {config.data.name!r} populations is not supported: analyses need an in-memory "
            f"test set ({', '.join(data_lib.IN_MEMORY_DATASETS)})")
    data = data_lib.load_in_memory(config.data.name, 1.0, config.data.seed, False,
                                   config.data.data_dir or None)
    return TestSet(data.test_images, data.test_labels, data.mean, data.std, data.num_classes,
                   config.data.name)


def load_train_set(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """The full, correctly labelled training split: images (N, H, W, C) uint8, labels (N,)."""
    data = data_lib.load_in_memory(config.data.name, 1.0, config.data.seed, False,
                                   config.data.data_dir or None)
    return data.train_images, data.train_labels


def load_predictions(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """predictions/test.npz of `workdir`: logits (M, N, C) float32 and labels (N,) int."""
    path = os.path.join(workdir, "predictions", "test.npz")
    if not os.path.exists(path):
        raise AnalysisInputError(f"workdir {workdir!r} has no predictions/test.npz: its training has not "
                                 f"finished; run `python train.py --workdir {workdir}` to finish it")
    with np.load(path) as f:
        return f["logits"].astype(np.float32), f["labels"]


def check_comparable(workdirs: Sequence[str], configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Raises AnalysisInputError unless all runs were trained and tested on the same data set
    (same data.name and data.data_dir)."""
    for workdir, config in zip(workdirs[1:], configs[1:]):
        for field in ("name", "data_dir"):
            a, b = configs[0].data[field], config.data[field]
            if a != b:
                raise AnalysisInputError(
                    f"populations are not comparable: {workdirs[0]!r} has data.{field}={a!r} but {workdir!r} "
                    f"has data.{field}={b!r}; compare populations tested on the same test set")


def check_same_labels(workdirs: Sequence[str], labels: Sequence[np.ndarray]) -> None:
    """Raises AnalysisInputError unless every workdir's predictions share the same test labels."""
    for workdir, other in zip(workdirs[1:], labels[1:]):
        if other.shape != labels[0].shape or not np.array_equal(other, labels[0]):
            raise AnalysisInputError(
                f"test sets differ: {workdirs[0]!r} has {labels[0].shape[0]} test labels and {workdir!r} "
                f"{other.shape[0]}, not the same examples in the same order")
