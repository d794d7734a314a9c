"""Fashion-MNIST (Zalando; 60,000 train / 10,000 test 28x28 grayscale images, 10 classes).

Read from the four standard IDX files. Where (:func:`~cka_jax.data.datasets.load_fashion_mnist`):

* ``data.data_dir`` (a run config field) given: there and nowhere else, its four IDX files, or,
  when it holds none of them, a tensorflow-datasets ``fashion_mnist`` prepared in it; a directory
  that does not exist or lacks one of the four files is refused, never replaced by another copy;
* not given: :data:`DEBIAN_DIR`, where ``apt-get install dataset-fashion-mnist`` puts them
  (Debian, Ubuntu, Colab), else tensorflow-datasets' ``fashion_mnist`` in tfds's default place.

Every file is checked as it is read (magic number, dimensions, length, matching counts, label
range): a damaged or truncated file is an error naming it, never fewer or shifted images. The
splits are told apart by the files' names only, so :func:`read_splits` also checks that each has
the size Fashion-MNIST's has (:data:`SPLIT_SIZES`: train and test files swapped, or empty, are
refused) and that the test images are not the training images.
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
FILE_NAMES = tuple(name for pair in FILES.values() for name in pair)  # the four IDX files
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SIDE, NUM_CLASSES = 28, len(CLASS_NAMES)
SPLIT_SIZES = {"train": 60000, "test": 10000}  # images in each split of Fashion-MNIST
# The test split shares at most this fraction of its images with the training split (the real
# files: exact duplicates only, a handful); above it the "test" files hold training images.
MAX_SHARED_TEST_FRACTION = 0.5
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


def missing_files(directory: str) -> list[str]:
    """Names (without .gz) of the four IDX files that ``directory`` does not hold."""
    return [name for name in FILE_NAMES if find_file(directory, name) is None]


def idx_directory(data_dir: str | None) -> str | None:
    """Where the IDX files are read from: ``data_dir`` when given and it holds all four, else
    (none given) :data:`DEBIAN_DIR` when it holds all four; None otherwise. A given ``data_dir``
    is never replaced by :data:`DEBIAN_DIR`."""
    directory = data_dir or DEBIAN_DIR
    return directory if os.path.isdir(directory) and not missing_files(directory) else None


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


def read_splits(directory: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both splits (:func:`read_split`) by name, checked against each other: :class:`IdxFileError`
    when a split does not have Fashion-MNIST's size (:data:`SPLIT_SIZES`; say the train and test
    files are swapped, or empty) or when most test images are training images."""
    splits = {split: read_split(directory, split) for split in FILES}
    sizes = {split: len(labels) for split, (_, labels) in splits.items()}
    if sizes != SPLIT_SIZES:
        split = next(s for s in FILES if sizes[s] != SPLIT_SIZES[s])
        swapped = sizes == {"train": SPLIT_SIZES["test"], "test": SPLIT_SIZES["train"]}
        why = (
            f"the train and test files are swapped: the train-* names must hold the {SPLIT_SIZES['train']} "
            "training images"
            if swapped
            else "use the four files of https://github.com/zalandoresearch/fashion-mnist"
        )
        raise IdxFileError(
            f"{find_file(directory, FILES[split][0])} holds {sizes[split]} images, but Fashion-MNIST's "
            f"{split} split has {SPLIT_SIZES[split]}: {why}"
        )
    train = {image.tobytes() for image in splits["train"][0]}
    shared = sum(image.tobytes() in train for image in splits["test"][0])
    if shared > MAX_SHARED_TEST_FRACTION * sizes["test"]:
        raise IdxFileError(
            f"{shared} of the {sizes['test']} test images in {find_file(directory, FILES['test'][0])} are also "
            f"in {find_file(directory, FILES['train'][0])}: the test files hold training images; use the "
            "four files of https://github.com/zalandoresearch/fashion-mnist"
        )
    return splits
