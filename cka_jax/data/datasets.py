"""Data sets for population training: digits (bundled), Fashion-MNIST (IDX files or tfds),
CIFAR-10/100 and ImageNet via tfds.

:data:`DATASETS` holds one :class:`DatasetInfo` per data set (classes, image shape, held in
memory or streamed, split and class names, loader): the one place these facts are written down.
A location the user gives (``data.data_dir``) is used or refused (:class:`DataNotAvailableError`
naming it and what it lacks), never replaced by another copy; fallbacks (Debian's Fashion-MNIST,
tfds's default data_dir) apply only when none is given. Every split a run uses holds examples.
Small data sets (digits, Fashion-MNIST, CIFAR) are loaded once as uint8 arrays and held on device; each
model's batches are gathered and augmented there with ``jax.random`` (see
:func:`augment_images`). ImageNet is streamed from host (:mod:`cka_jax.train.imagenet_stream`).
Images are ``(N, H, W, C)`` uint8, labels ``(N,)`` int32.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cka_jax.data import fashion_mnist
from cka_jax.data.tfds_data import DataNotAvailableError, check_data_dir, is_local, source_to_arrays, tfds_source

DIGITS_SPLIT_SEED = 0  # the digits train/test split is fixed, whatever data.seed is
DIGITS_TEST_FRACTION = 0.2

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A labelled train/test pair of uint8 image arrays, with per-channel normalisation."""

    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray  # (N_test, H, W, C) uint8
    test_labels: np.ndarray  # (N_test,) int32
    num_classes: int
    mean: np.ndarray  # (C,) float32, of train_images / 255
    std: np.ndarray  # (C,) float32

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 ``images`` (N, H, W, C) scaled to [0, 1]."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-3).astype(np.float32)


def load_digits() -> ImageData:
    """scikit-learn's 8x8 digits as (8, 8, 1) uint8 images, fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    mean, std = channel_stats(x_tr)
    return ImageData(x_tr, y_tr, x_te, y_te, dataset("digits").num_classes, mean, std)


def load_tfds_arrays(name: str, data_dir: str | None = None) -> ImageData:
    """The train and test splits of a tfds data set held in memory (CIFAR-10/100), from
    ``tfds.data_source``, as arrays."""
    info = dataset(name)
    train_split, test_split = info.splits
    train_images, train_labels = source_to_arrays(tfds_source(name, train_split, data_dir))
    test_images, test_labels = source_to_arrays(tfds_source(name, test_split, data_dir))
    mean, std = channel_stats(train_images)
    return ImageData(train_images, train_labels, test_images, test_labels, info.num_classes, mean, std)


def load_fashion_mnist(data_dir: str | None = None) -> ImageData:
    """Fashion-MNIST as (28, 28, 1) uint8 images from its IDX files or tfds, where
    :mod:`cka_jax.data.fashion_mnist` says: a given ``data_dir`` only, else Debian's package,
    else tfds's default. :class:`DataNotAvailableError` naming the location and what it lacks,
    saying how to install it, or naming a damaged file or splits that are not Fashion-MNIST's."""
    check_data_dir("fashion_mnist", data_dir)
    directory = fashion_mnist.idx_directory(data_dir)
    if data_dir and directory is None and is_local(data_dir):
        missing = fashion_mnist.missing_files(data_dir)
        if len(missing) < len(fashion_mnist.FILE_NAMES):  # some of the IDX files are there: not a tfds data_dir
            raise DataNotAvailableError(
                f"data.data_dir={data_dir} lacks Fashion-MNIST's {', '.join(missing)} (.gz or not): put the "
                f"four IDX files there, or leave data.data_dir empty to use {fashion_mnist.DEBIAN_DIR} "
                "(`apt-get install dataset-fashion-mnist`) or tensorflow-datasets"
            )
    try:
        if directory is None:
            return load_tfds_arrays("fashion_mnist", data_dir)
        splits = fashion_mnist.read_splits(directory)
    except fashion_mnist.IdxFileError as error:
        raise DataNotAvailableError(str(error)) from error
    except DataNotAvailableError as error:
        if data_dir:
            raise DataNotAvailableError(
                f"data.data_dir={data_dir} holds none of Fashion-MNIST's IDX files "
                f"({', '.join(fashion_mnist.FILE_NAMES)}, .gz or not) and no tensorflow-datasets fashion_mnist "
                "prepared in it: put the four IDX files there, or "
                f"leave data.data_dir empty to use {fashion_mnist.DEBIAN_DIR} (`apt-get install dataset-fashion-mnist`)"
            ) from error
        raise DataNotAvailableError(
            f"Fashion-MNIST's IDX files are not in {fashion_mnist.DEBIAN_DIR} (data.data_dir is not set), and "
            f"tensorflow-datasets does not have it either: {fashion_mnist.INSTALL_HINT}"
        ) from error
    logger.info("Fashion-MNIST from the IDX files in %s", directory)
    (train_images, train_labels), (test_images, test_labels) = splits["train"], splits["test"]
    mean, std = channel_stats(train_images)
    return ImageData(train_images, train_labels, test_images, test_labels, fashion_mnist.NUM_CLASSES, mean, std)


def subset_indices(num_examples: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a reproducible random ``fraction`` of ``num_examples`` (at least 1).

    Subsets from one seed are nested: the 1/64 subset lies inside the 1/8 subset.
    """
    order = np.random.default_rng([seed, 0x5EB5E7]).permutation(num_examples)
    return np.sort(order[: max(1, int(round(fraction * num_examples)))])


def random_labels(num_examples: int, num_classes: int, seed: int) -> np.ndarray:
    """(num_examples,) int32 labels drawn uniformly from ``seed`` (memorisation studies)."""
    return np.random.default_rng([seed, 0x1ABE1]).integers(0, num_classes, num_examples).astype(np.int32)


def training_subset(data: ImageData, fraction: float, seed: int, use_random_labels: bool) -> ImageData:
    """``data`` with its training set cut to ``fraction`` and optionally relabelled at random.

    Normalisation statistics stay those of the full training set; the test set is untouched.
    """
    idx = subset_indices(len(data.train_labels), fraction, seed)
    labels = data.train_labels[idx]
    if use_random_labels:
        labels = random_labels(len(data.train_labels), data.num_classes, seed)[idx]
    return dataclasses.replace(data, train_images=data.train_images[idx], train_labels=labels)


# What check_data loaded, by (name, data_dir), for the next load_in_memory of it (one entry).
_PRELOADED: dict[tuple[str, str | None], ImageData] = {}


def _load_checked(info: DatasetInfo, data_dir: str | None) -> ImageData:
    """``info``'s loader's data, refused when a split holds no examples."""
    assert info.load is not None
    data = info.load(data_dir)
    for split, labels in (("training", data.train_labels), ("test", data.test_labels)):
        if len(labels) == 0:  # the loaders refuse empty splits: a guard for any other
            raise DataNotAvailableError(
                f"{info.name}'s {split} split (data.data_dir={data_dir or 'not set'}) holds no examples"
            )
    return data


def check_data(name: str, data_dir: str | None = None) -> None:
    """Find every mistake in the data a run names before the run writes anything: load an
    in-memory data set in full (checked as :func:`load_in_memory` does), open both splits of a
    streamed one. :class:`DataNotAvailableError` naming what is wrong. The loaded data is kept
    for the next :func:`load_in_memory` of ``name`` and ``data_dir`` in this process, which
    takes it, so a run reads its data once."""
    info = dataset(name)
    _PRELOADED.clear()
    if info.load is None:
        for split in info.splits:
            tfds_source(name, split, data_dir)
        return
    _PRELOADED[(name, data_dir or None)] = _load_checked(info, data_dir)


def load_in_memory(
    name: str, fraction: float = 1.0, seed: int = 0, use_random_labels: bool = False, data_dir: str | None = None
) -> ImageData:
    """The named small data set, subset and relabelled per the arguments."""
    info = DATASETS.get(name)
    if info is None or info.load is None:
        in_memory = tuple(n for n, i in DATASETS.items() if not i.streamed)
        raise ValueError(f"'{name}' is not an in-memory data set ({in_memory})")
    data = _PRELOADED.pop((name, data_dir or None), None) or _load_checked(info, data_dir)
    data = training_subset(data, fraction, seed, use_random_labels)
    logger.info(
        "%s: %d train / %d test images of shape %s",
        name,
        len(data.train_labels),
        len(data.test_labels),
        data.image_shape,
    )
    return data


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
    """uint8 (..., C) → ``(x / 255 - mean) / std`` in ``dtype``."""
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def augment_images(key: jax.Array, images: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
    """Reflect-pad + random crop and random horizontal flip, per example.

    Args:
      key: PRNG key; the same key gives the same augmentation.
      images: (B, H, W, C) array of any dtype.
    Returns:
      (B, H, W, C) array like ``images``.
    """
    batch, height, width, channels = images.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
        offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (height, width, channels)))(
            padded, offsets
        )
    if flip:
        mirrored = jax.random.bernoulli(flip_key, 0.5, (batch,))
        images = jnp.where(mirrored[:, None, None, None], images[:, :, ::-1], images)
    return images


# ----------------------------------------------------------------------------- the data sets


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the package knows about one data set (a run config's ``data.name``)."""

    name: str  # data.name, and its tensorflow-datasets name
    num_classes: int
    channels: int
    side: int | None  # height = width of its images; None: resized to data.image_size (streamed)
    streamed: bool  # read and augmented on the host every step, else held in memory (on device)
    splits: tuple[str, str]  # (train, test) split names
    source: (
        str  # "scikit-learn", "idx" (IDX files, else tfds) or "tfds": where the images and the class names come from
    )
    load: Callable[[str | None], ImageData] | None  # (data_dir) -> all of it in memory; None if streamed
    label_names: tuple[str, ...] | None = None  # class names by index, where the package knows them

    def image_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(H, W, C) of its images as the models see them; ``image_size`` (data.image_size) sets
        H and W of a data set resized on load."""
        if self.side is not None:
            return (self.side, self.side, self.channels)
        if image_size is None:
            raise ValueError(f"{self.name} images are resized to data.image_size: give image_size")
        return (image_size, image_size, self.channels)

    def class_names(self, data_dir: str | None = None) -> list[str]:
        """Names of the classes, by class index: the package's own list (Fashion-MNIST), tfds's
        label names (ImageNet: WordNet ids) where tfds knows them here (CIFAR's need the prepared
        data), else the class indices."""
        if self.label_names is not None:
            return list(self.label_names)
        indices = [str(c) for c in range(self.num_classes)]
        if self.source != "tfds":
            return indices
        import tensorflow_datasets as tfds

        names = tfds.builder(self.name, data_dir=data_dir or None).info.features["label"].names
        return list(names) if len(names) == self.num_classes else indices


def _tfds_loader(name: str) -> Callable[[str | None], ImageData]:
    return lambda data_dir: load_tfds_arrays(name, data_dir)


_TRAIN_TEST = ("train", "test")
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            "digits", num_classes=10, channels=1, side=8, streamed=False, splits=_TRAIN_TEST,
            source="scikit-learn", load=lambda data_dir: load_digits(),
        ),
        DatasetInfo(
            "fashion_mnist", num_classes=fashion_mnist.NUM_CLASSES, channels=1, side=fashion_mnist.SIDE,
            streamed=False, splits=_TRAIN_TEST, source="idx", load=load_fashion_mnist,
            label_names=fashion_mnist.CLASS_NAMES,
        ),
        DatasetInfo(
            "cifar10", num_classes=10, channels=3, side=32, streamed=False, splits=_TRAIN_TEST,
            source="tfds", load=_tfds_loader("cifar10"),
        ),
        DatasetInfo(
            "cifar100", num_classes=100, channels=3, side=32, streamed=False, splits=_TRAIN_TEST,
            source="tfds", load=_tfds_loader("cifar100"),
        ),
        DatasetInfo(
            "imagenet2012", num_classes=1000, channels=3, side=None, streamed=True, splits=("train", "validation"),
            source="tfds", load=None,
        ),
    )
}  # fmt: skip


def dataset(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {tuple(DATASETS)}")
    return DATASETS[name]


def image_shape(config: Any) -> tuple[int, int, int]:
    """(H, W, C) of the images a run config's models see (its data.name and data.image_size)."""
    return dataset(config.data.name).image_shape(config.data.image_size)
