"""Fashion-MNIST-shaped IDX files the tests write: small sets, full-size ones, single files."""

import gzip
import os

import numpy as np

from cka_jax.data import fashion_mnist


def write_idx(path, array, magic=None, gz=True):
    """Write ``array`` (uint8) as an IDX file (magic 0x08 type, ndim) and return its path."""
    array = np.asarray(array, np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    if gz:
        path = str(path) + ".gz"
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)
    return path


def write_set(directory, num_train=20, num_test=10, gz=True):
    """A small Fashion-MNIST-shaped set of IDX files; returns its (train, test) arrays."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        images_name, labels_name = fashion_mnist.FILES[split]
        write_idx(os.path.join(directory, images_name), images, gz=gz)
        write_idx(os.path.join(directory, labels_name), labels, gz=gz)
        arrays[split] = (images, labels)
    return arrays


def write_full_size(directory, swapped=False, test_from_train=False, num_test=10000):
    """Uncompressed IDX files of Fashion-MNIST's sizes (mostly blank images, each one distinct);
    `swapped`: the test split under the train names and the other way round; `test_from_train`:
    the test images are the first training images."""
    os.makedirs(directory, exist_ok=True)
    train = np.zeros((fashion_mnist.SPLIT_SIZES["train"], 28, 28), np.uint8)
    train.reshape(len(train), -1)[:, :3] = np.stack(np.unravel_index(np.arange(len(train)), (256, 256, 256)), 1)
    test = train[:num_test].copy() if test_from_train else 255 - train[:num_test]
    arrays = {"train": test, "test": train} if swapped else {"train": train, "test": test}
    for split, images in arrays.items():
        write_idx(os.path.join(directory, fashion_mnist.FILES[split][0]), images, gz=False)
        write_idx(os.path.join(directory, fashion_mnist.FILES[split][1]), np.arange(len(images)) % 10, gz=False)
