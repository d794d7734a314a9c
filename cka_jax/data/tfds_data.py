"""Where a data set is read from: a location the user gives is used or refused, never replaced,
and tensorflow-datasets' sources, prepared once where that is possible.

:class:`DataNotAvailableError` says, in one line, which location lacks what and how to get it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import numpy as np

logger = logging.getLogger(__name__)


class DataNotAvailableError(RuntimeError):
    """The data a run names cannot be used: not where it says (``data.data_dir``), not prepared
    or preparable here, or damaged (a file that is not what its name says, an empty split)."""


def is_local(data_dir: str) -> bool:
    """Whether ``data_dir`` is a path on this machine (not a ``gs://``-style URL tfds reads)."""
    return "://" not in data_dir


def check_data_dir(name: str, data_dir: str | None) -> None:
    """:class:`DataNotAvailableError` when ``data_dir`` (``data.data_dir``) is given for data set
    ``name`` but is not a directory here: it is never replaced by another location."""
    if not data_dir or not is_local(data_dir) or os.path.isdir(data_dir):
        return
    what = "does not exist" if not os.path.lexists(data_dir) else "is not a directory"
    holds = (
        "Fashion-MNIST's four IDX files (or a tensorflow-datasets data_dir with fashion_mnist prepared in it)"
        if name == "fashion_mnist"
        else f"a tensorflow-datasets data_dir with {name} prepared in it"
    )
    raise DataNotAvailableError(
        f"data.data_dir={data_dir} {what}: give the directory that holds {holds}, "
        "or leave data.data_dir empty to use the default location"
    )


class _DropTfdsLookupWarnings(logging.Filter):
    """tensorflow-datasets' warnings while it looks for a data set that is not prepared ("Variant
    folder ... has no dataset_info.json"): the error that follows says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or f"{os.sep}tensorflow_datasets{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_tfds_lookup() -> Iterator[None]:
    drop = _DropTfdsLookupWarnings()
    absl_logger = logging.getLogger("absl")  # tfds logs through absl
    absl_logger.addFilter(drop)
    try:
        yield
    finally:
        absl_logger.removeFilter(drop)


def tfds_source(name: str, split: str, data_dir: str | None = None):
    """``tfds.data_source(name, split)``; prepares the data set once if it can (TensorFlow and
    network), else raises :class:`DataNotAvailableError` saying how to get it."""
    import importlib.util

    import tensorflow_datasets as tfds

    check_data_dir(name, data_dir)
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
    how = (
        f"Preparing it once needs network and TensorFlow: `pip install 'cka_jax[data]'` then "
        f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}')"
        f".download_and_prepare(file_format='array_record')\"` (or copy a prepared copy into "
        f"the data_dir given by config field data.data_dir)."
    )
    try:
        with _quiet_tfds_lookup():
            source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as error:  # not prepared (tfds raises assorted errors)
        missing = error
        if importlib.util.find_spec("tensorflow") is None:
            raise DataNotAvailableError(
                f"tensorflow-datasets '{name}' (split '{split}') is not prepared in {where}, and "
                f"TensorFlow is not installed to prepare it. {how}"
            ) from missing
        logger.info("preparing tensorflow-datasets '%s' in %s", name, where)
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=True)
        except Exception as error:
            raise DataNotAvailableError(
                f"tensorflow-datasets '{name}' (split '{split}') is not prepared in {where} and "
                f"preparing it failed ({type(error).__name__}: {error}). {how}"
            ) from error
    if len(source) == 0:
        raise DataNotAvailableError(
            f"tensorflow-datasets '{name}' in {where} holds no examples in its split '{split}'; prepare it again. {how}"
        )
    return source


def source_to_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    """A tfds data source -> images (N, H, W, C) uint8, labels (N,) int32."""
    images, labels = [], []
    for i in range(len(source)):
        example = source[i]
        images.append(np.asarray(example["image"], np.uint8))
        labels.append(int(example["label"]))
    return np.stack(images), np.asarray(labels, np.int32)
