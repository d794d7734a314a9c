"""Fashion-MNIST: the IDX reader against the real files and damaged ones, where the files are
looked for, the install message, and a short real training run and analysis."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
from fashion_idx import write_full_size, write_idx, write_set
from tiny import ROOT, run_train

from cka_jax.data import datasets as data
from cka_jax.data import fashion_mnist

REAL = fashion_mnist.idx_directory(None)
needs_files = pytest.mark.skipif(
    REAL is None,
    reason=f"Fashion-MNIST's IDX files are not in {fashion_mnist.DEBIAN_DIR}: `apt-get install dataset-fashion-mnist`",
)
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist.py")


@pytest.fixture
def no_debian_files(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "not_installed"))


@pytest.fixture
def small_splits(monkeypatch):
    """The sizes of `write_set`'s splits stand for Fashion-MNIST's 60000 and 10000."""
    monkeypatch.setattr(fashion_mnist, "SPLIT_SIZES", {"train": 20, "test": 10})


@needs_files
def test_real_files_shapes_labels_balance_and_known_values():
    d = data.load_in_memory("fashion_mnist")
    assert d.train_images.shape == (60000, 28, 28, 1) and d.test_images.shape == (10000, 28, 28, 1)
    assert d.train_images.dtype == np.uint8 and d.train_labels.dtype == d.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(d.train_labels), [6000] * 10)  # balanced classes
    np.testing.assert_array_equal(np.bincount(d.test_labels), [1000] * 10)
    # published facts of the data set: first labels (ankle boot, T-shirt, ...), pixel statistics
    np.testing.assert_array_equal(d.train_labels[:6], [9, 0, 0, 3, 0, 2])
    np.testing.assert_array_equal(d.test_labels[:6], [9, 2, 1, 1, 6, 1])
    np.testing.assert_allclose([d.mean[0], d.std[0]], [0.2860, 0.3530], atol=1e-4)
    assert d.num_classes == 10 and data.dataset("fashion_mnist").image_shape() == (28, 28, 1)
    assert data.dataset("fashion_mnist").class_names()[9] == "Ankle boot"


@needs_files
def test_fraction_subsets_the_real_training_set_only():
    d = data.load_in_memory("fashion_mnist", fraction=0.125, seed=2)
    assert len(d.train_labels) == 7500 and len(d.test_labels) == 10000
    assert np.bincount(d.train_labels).min() > 650  # a random eighth keeps every class


@pytest.mark.usefixtures("small_splits")
@pytest.mark.parametrize("gz", [True, False])
def test_data_dir_comes_first_gzipped_or_not(tmp_path, gz):
    arrays = write_set(tmp_path, gz=gz)
    d = data.load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(d.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(d.test_labels, arrays["test"][1])
    assert d.train_images.shape == (20, 28, 28, 1) and d.test_images.shape == (10, 28, 28, 1)


def _damage(directory, how):
    images = os.path.join(directory, fashion_mnist.FILES["train"][0] + ".gz")
    labels = os.path.join(directory, fashion_mnist.FILES["train"][1] + ".gz")
    if how == "truncated":
        raw = gzip.open(images).read()
        with gzip.open(images, "wb") as f:
            f.write(raw[:-100])
        return images, "damaged"
    if how == "not gzip":
        with open(images, "wb") as f:
            f.write(b"this is not gzip data")
        return images, "cannot read"
    if how == "cut gzip":
        raw = open(images, "rb").read()
        with open(images, "wb") as f:
            f.write(raw[: len(raw) // 2])
        return images, "cannot read"
    if how == "wrong magic":
        write_idx(images[:-3], np.zeros((20, 28, 28)), magic=0x0801 + 0x10)
        return images, "not an IDX file"
    if how == "other shape":
        write_idx(images[:-3], np.zeros((20, 32, 32)))
        return images, r"shape \(32, 32\)"
    if how == "fewer labels":
        write_idx(labels[:-3], np.zeros(19))
        return labels, "20 images but"
    if how == "bad label":
        write_idx(labels[:-3], np.full(20, 10))
        return labels, "label 10"
    raise AssertionError(how)


@pytest.mark.usefixtures("small_splits")
@pytest.mark.parametrize(
    "how", ["truncated", "not gzip", "cut gzip", "wrong magic", "other shape", "fewer labels", "bad label"]
)
def test_damaged_files_are_an_error_naming_the_file(tmp_path, how):
    write_set(tmp_path)
    path, message = _damage(tmp_path, how)
    with pytest.raises(data.DataNotAvailableError, match=message) as error:
        data.load_fashion_mnist(str(tmp_path))
    assert os.path.basename(path) in str(error.value)


@pytest.mark.usefixtures("small_splits")
def test_missing_everywhere_says_how_to_install(tmp_path, no_debian_files):
    (tmp_path / "empty").mkdir()
    write_set(tmp_path / "half")
    os.remove(os.path.join(tmp_path / "half", fashion_mnist.FILES["test"][1] + ".gz"))
    for data_dir in (str(tmp_path / "empty"), str(tmp_path / "half"), None):
        with pytest.raises(data.DataNotAvailableError, match="apt-get install dataset-fashion-mnist"):
            data.load_fashion_mnist(data_dir)


def _lacking(directory, name):
    write_set(directory)
    os.remove(os.path.join(directory, name + ".gz"))


GIVEN_DATA_DIRS = [
    # (id, make the given data_dir under tmp_path, substrings of the refusal)
    ("does_not_exist", lambda d: None, ["does not exist"]),
    ("is_a_file", lambda d: open(d, "w").close(), ["is not a directory"]),
    ("empty", os.mkdir, ["holds none of Fashion-MNIST's IDX files", "no tensorflow-datasets fashion_mnist"]),
    *[
        (f"lacks_{name}", lambda d, name=name: _lacking(d, name), ["lacks Fashion-MNIST's " + name])
        for name in fashion_mnist.FILE_NAMES
    ],
]


@pytest.mark.usefixtures("small_splits")
@pytest.mark.parametrize(
    "make, expected", [(m, e) for _, m, e in GIVEN_DATA_DIRS], ids=[i for i, _, _ in GIVEN_DATA_DIRS]
)
def test_a_given_data_dir_is_used_or_refused_never_replaced(tmp_path, monkeypatch, make, expected):
    """Debian's copy is there, but a data.data_dir the user gave is the only place looked in: it
    lacking the data is one line naming it and what it lacks (it used to fall back to Debian's)."""
    debian = write_set(tmp_path / "debian")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "debian"))
    given = str(tmp_path / "given")
    make(given)
    with pytest.raises(data.DataNotAvailableError) as error:
        data.load_fashion_mnist(given)
    message = str(error.value)
    assert f"data.data_dir={given} " in message and "\n" not in message, message
    for text in expected:
        assert text in message, message
    np.testing.assert_array_equal(data.load_fashion_mnist(None).train_labels, debian["train"][1])  # none given


SPLIT_MISTAKES = [
    # (id, write the IDX files into a directory, substrings of the refusal)
    ("swapped", lambda d: write_full_size(d, swapped=True), ["holds 10000 images", "train split has 60000", "swapped"]),
    (
        "test_is_train",
        lambda d: write_full_size(d, test_from_train=True),
        ["10000 of the 10000 test images", "also in"],
    ),
    ("empty", lambda d: write_set(d, num_train=0, num_test=0), ["holds 0 images", "train split has 60000"]),
    ("empty_test", lambda d: write_full_size(d, num_test=0), ["holds 0 images", "test split has 10000"]),
    ("another_size", lambda d: write_set(d), ["holds 20 images", "train split has 60000"]),
]


@pytest.mark.parametrize(
    "write, expected", [(w, e) for _, w, e in SPLIT_MISTAKES], ids=[i for i, _, _ in SPLIT_MISTAKES]
)
def test_splits_that_are_not_fashion_mnists_are_refused(tmp_path, write, expected):
    """The file names are all that tells the splits apart: each split must have Fashion-MNIST's
    size, and the test images must not be training images (swapped files used to train on the
    test set; empty ones ended in a ZeroDivisionError)."""
    write(str(tmp_path / "idx"))
    with pytest.raises(data.DataNotAvailableError) as error:
        data.load_in_memory("fashion_mnist", data_dir=str(tmp_path / "idx"))
    message = str(error.value)
    for text in expected:
        assert text in message, message
    assert str(tmp_path / "idx") in message and "\n" not in message


@pytest.mark.slow  # writes and reads 70,000 images
def test_full_size_distinct_splits_are_read(tmp_path):
    write_full_size(str(tmp_path / "idx"))
    d = data.load_in_memory("fashion_mnist", fraction=0.5, data_dir=str(tmp_path / "idx"))
    assert len(d.train_labels) == 30000 and len(d.test_labels) == 10000


@pytest.mark.slow
def test_damaged_file_stops_train_py_with_one_line(tmp_path):
    write_set(tmp_path / "idx")
    _damage(tmp_path / "idx", "truncated")
    args = [f"--config={CONFIG}:depth=8,size=1,epochs=1", f"--config.data.data_dir={tmp_path / 'idx'}"]
    code, err = run_train(*args, "--workdir", str(tmp_path / "run"), timeout=120)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0].startswith("train.py: error: ") and "train-images-idx3-ubyte.gz" in errors[0], err


@pytest.mark.slow
@needs_files
def test_short_real_training_run_learns_and_analyses(tmp_path):
    """A ResNet-8 (0.5x) on 1/20 of the real training set for 2 epochs (46 steps; 0.60 test
    accuracy measured): it learns (chance: 0.1), the predictions cover the real test set, and
    analyze.py reads it back."""
    import subprocess

    workdir = str(tmp_path / "run")
    args = [f"--config={CONFIG}:depth=8,width=0.5,size=1,epochs=2,fraction=0.05", "--workdir", workdir]
    args += ["--config.train.eval_every_epochs=2"]  # one pass over the 10,000 test images, at the end
    code, err = run_train(*args, timeout=300)
    assert code == 0, err
    predictions = np.load(os.path.join(workdir, "predictions", "test.npz"))
    assert predictions["logits"].shape == (1, 10000, 10)
    assert np.mean(predictions["logits"].argmax(-1) == predictions["labels"]) > 0.4
    analyze = [sys.executable, os.path.join(ROOT, "analyze.py"), "--workdir", workdir, "--analyses=within,blocks"]
    result = subprocess.run(analyze, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    blocks = json.load(open(os.path.join(workdir, "analysis", "blocks.json")))
    assert "block_fraction_mean" in json.dumps(blocks)
