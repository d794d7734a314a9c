"""ImageNet (tfds ``imagenet2012``) streamed from host with grain.

Training examples: Inception-style random-resized crop (8%-100% area, 3/4-4/3 aspect) and a
random horizontal flip, decoded and augmented by ``data.num_workers`` threads; test examples:
resize the shorter side to ``size * 256 / 224`` and centre-crop. Batches are uint8
``(B, size, size, 3)``; normalisation (:data:`MEAN`, :data:`STD`) happens on device. Example i
of the run (step ``i // B``) depends only on the seed and i, so a resumed run continues with
exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
from PIL import Image

from cka_jax.data import datasets as data_lib

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8: random area/aspect crop, resized, maybe flipped."""
    height, width = image.shape[:2]
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * height * width
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            break
    else:  # fall back to the central square crop
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    crop = Image.fromarray(image[top : top + h, left : left + w]).resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(crop, np.uint8)
    return out[:, ::-1] if rng.random() < 0.5 else out


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3): shorter side to size*256/224, then the centre."""
    height, width = image.shape[:2]
    scale = size * 256 / 224 / min(height, width)
    h, w = max(size, int(round(height * scale))), max(size, int(round(width * scale)))
    resized = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC), np.uint8)
    top, left = (h - size) // 2, (w - size) // 2
    return resized[top : top + size, left : left + size]


def _stack(examples):
    images, labels = zip(*examples, strict=True)
    return np.stack(images), np.asarray(labels, np.int32)


class ImageNetStream:
    """Train/test batches of a streamed data set (ImageNet) for a run config (``data.*`` fields)."""

    mean, std = MEAN, STD  # (3,) normalisation, applied on device

    def __init__(self, config: ml_collections.ConfigDict):
        d = config.data
        info = data_lib.dataset(d.name)
        train_split, test_split = info.splits
        self.size, self.seed, self.workers = d.image_size, d.seed, d.num_workers
        self.train_source = data_lib.tfds_source(info.name, train_split, d.data_dir or None)
        self.test_source = data_lib.tfds_source(info.name, test_split, d.data_dir or None)
        self.indices = data_lib.subset_indices(len(self.train_source), d.fraction, d.seed)
        self.labels = None
        if d.random_labels:
            self.labels = data_lib.random_labels(len(self.train_source), info.num_classes, d.seed)
        self.num_train = len(self.indices)
        # The current epoch's order, and the next one's where a batch spans the two.
        self._epoch_order = functools.lru_cache(maxsize=2)(self._shuffled)

    def _shuffled(self, epoch: int) -> np.ndarray:
        """(num_train,) indices of the training examples in ``epoch``'s order."""
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(self.num_train)]

    def _train_example(self, i: int, examples_per_epoch: int):
        epoch, position = divmod(i, examples_per_epoch)
        index = int(self._epoch_order(epoch)[position])
        example = self.train_source[index]
        rng = np.random.default_rng([self.seed, 0xC0DE, i])
        image = random_resized_crop(np.asarray(example["image"], np.uint8), self.size, rng)
        label = int(self.labels[index] if self.labels is not None else example["label"])
        return image, label

    def train_batches(self, start_step: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (B, size, size, 3) uint8 / (B,) int32 batches from step ``start_step`` on."""
        per_epoch = (self.num_train // batch_size) * batch_size  # last partial batch dropped
        dataset = (
            grain.MapDataset.range(start_step * batch_size, 2**62)
            .map(lambda i: self._train_example(i, per_epoch))
            .batch(batch_size, drop_remainder=True, batch_fn=_stack)
        )
        return iter(
            dataset.to_iter_dataset(grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=2 * batch_size))
        )

    def _test_example(self, i: int):
        example = self.test_source[i]
        return center_crop(np.asarray(example["image"], np.uint8), self.size), int(example["label"])

    @property
    def num_test(self) -> int:
        return len(self.test_source)

    def test_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Padded (B, size, size, 3) uint8, (B,) labels and (B,) valid-mask batches of the
        validation set, in order; the last batch is zero-padded to full size."""
        dataset = grain.MapDataset.range(self.num_test).map(self._test_example).batch(batch_size, batch_fn=_stack)
        for images, labels in dataset.to_iter_dataset(grain.ReadOptions(num_threads=self.workers)):
            valid = np.ones(batch_size, bool)
            pad = batch_size - len(labels)
            if pad:
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
                labels = np.concatenate([labels, np.zeros(pad, np.int32)])
                valid[-pad:] = False
            yield images, labels, valid
