"""Fashion-MNIST (Zalando; 60,000 train / 10,000 test 28x28 grayscale images, 10 classes).

Read from the four standard IDX files, looked for in this order:

1. ``data.data_dir`` (a run config field), if it holds them;
2. :data:`DEBIAN_DIR`, where ``apt-get install dataset-fashion-mnist`` puts them (Debian, Ubuntu,
   Colab);
3. tensorflow-datasets' ``fashion_mnist`` (prepared in ``data.data_dir`` or tfds's default).

Every file is checked as it is read (magic number, dimensions, length, matching counts, label
range): a damaged or truncated file is an error naming it, never fewer or shifted images.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu/Colab: IDX files in "
    f"{DEBIAN_DIR}), or put the four IDX files (train-images-idx3-ubyte.gz, ...) of "
    "https://github.com/zalandoresearch/fashion-mnist in the directory given by config field data.data_dir"
)
FILES = {  # split -> (images file, labels file), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SIDE, NUM_CLASSES = 28, len(CLASS_NAMES)
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # 0x00000803: uint8, 3 dims; 0x00000801: uint8, 1 dim


class IdxFileError(ValueError):
    """An IDX file that is not what its name says (damaged, truncated, another data set)."""


def find_file(directory: str, name: str) -> str | None:
    """``directory/name.gz`` or ``directory/name``, whichever exists (gzip first); else None."""
    for candidate in (name + ".gz", name):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def idx_directory(data_dir: str | None) -> str | None:
    """The first of ``data_dir`` and :data:`DEBIAN_DIR` holding all four IDX files; else None."""
    for directory in (data_dir, DEBIAN_DIR):
        if directory and all(find_file(directory, f) for pair in FILES.values() for f in pair):
            return directory
    return None


def _read(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as error:  # truncated or not gzip
        raise IdxFileError(f"cannot read {path} ({type(error).__name__}: {error}); {INSTALL_HINT}") from error


def read_idx(path: str, magic: int, shape_tail: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of an IDX file: ``(N, *shape_tail)``, checked against the header.

    Raises :class:`IdxFileError` on a wrong magic number, other dimensions or a length that
    does not match the header (truncated or padded file).
    """
    raw = _read(path)
    ndim = len(shape_tail) + 1
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise IdxFileError(f"{path} is not an IDX file of {ndim}-d uint8 data (magic {found}, expected {magic})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape_tail:
        raise IdxFileError(f"{path} holds arrays of shape {dims[1:]}, expected {shape_tail}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise IdxFileError(f"{path} has {len(raw)} bytes, its header says {expected}: the file is damaged")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28, 1) uint8, labels (N,) int32)`` of ``split`` from IDX files."""
    images_name, labels_name = FILES[split]
    images_path, labels_path = find_file(directory, images_name), find_file(directory, labels_name)
    if images_path is None or labels_path is None:
        raise IdxFileError(f"Fashion-MNIST's {split} IDX files are not in {directory}; {INSTALL_HINT}")
    images = read_idx(images_path, _IMAGES_MAGIC, (SIDE, SIDE))
    labels = read_idx(labels_path, _LABELS_MAGIC, ())
    if len(images) != len(labels):
        raise IdxFileError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IdxFileError(f"{labels_path} holds label {labels.max()}; Fashion-MNIST has {NUM_CLASSES} classes")
    return images[..., None], labels.astype(np.int32)
