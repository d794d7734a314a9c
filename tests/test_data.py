"""Data: digits split, fraction subsets, random labels, the tfds path, augmentation."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cka_jax.data import datasets as data


def test_digits_split_is_fixed_stratified_and_uint8():
    a, b = data.load_digits(), data.load_digits()
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert a.train_images.shape[1:] == (8, 8, 1) and a.train_images.dtype == np.uint8
    assert len(a.train_labels) + len(a.test_labels) == 1797 and len(a.test_labels) == 360
    assert a.train_images.max() == 255 and a.num_classes == 10
    # stratified: every class has ~20% of its examples in the test set
    train_counts, test_counts = np.bincount(a.train_labels), np.bincount(a.test_labels)
    np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.01)


def test_fraction_subsets_are_reproducible_nested_and_sized():
    small, big = data.subset_indices(1000, 1 / 64, seed=3), data.subset_indices(1000, 1 / 8, seed=3)
    np.testing.assert_array_equal(small, data.subset_indices(1000, 1 / 64, seed=3))
    assert len(small) == 16 and len(big) == 125 and set(small) <= set(big)
    assert not np.array_equal(big, data.subset_indices(1000, 1 / 8, seed=4))
    assert len(data.subset_indices(1000, 1.0, 0)) == 1000
    digits = data.load_in_memory("digits", fraction=0.25, seed=1)
    assert len(digits.train_labels) == round(0.25 * 1437) and len(digits.test_labels) == 360


def test_random_labels_replace_labels_reproducibly():
    full = data.load_digits()
    a = data.load_in_memory("digits", fraction=0.5, seed=7, use_random_labels=True)
    b = data.load_in_memory("digits", fraction=0.5, seed=7, use_random_labels=True)
    clean = data.load_in_memory("digits", fraction=0.5, seed=7)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.train_images, clean.train_images)
    assert 0.02 < np.mean(a.train_labels == clean.train_labels) < 0.25  # ~1/10 agree by chance
    assert set(np.unique(a.train_labels)) == set(range(10))
    np.testing.assert_array_equal(a.test_labels, full.test_labels)  # test set untouched


def test_cifar10_through_tfds_data_source(tmp_path):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_in_memory("cifar10", fraction=0.5, seed=0)
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (12, 32, 32, 3) and ds.num_classes == 10
    assert ds.mean.shape == ds.std.shape == (3,)
    assert ds.train_labels.dtype == np.int32 and ds.train_labels.max() < 10


def test_missing_tfds_data_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataNotAvailableError, match="not prepared.*cka_jax\\[data\\]"):
        data.tfds_source("cifar10", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_an_empty_split_is_refused_naming_it(name):
    """A prepared split without examples is one line (it used to end in a ZeroDivisionError or
    numpy's 'need at least one array to stack')."""
    from cka_jax.train.imagenet_stream import ImageNetStream
    from cka_jax.workdir.config import base_config

    config = base_config()
    config.data.name, config.data.image_size, config.data.num_workers = name, 24, 1
    with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(data.DataNotAvailableError, match=f"'{name}' .*holds no examples in its split 'train'"):
            ImageNetStream(config) if name == "imagenet2012" else data.load_in_memory(name)


@pytest.mark.parametrize("made", ["nothing", "a file"])
def test_a_given_tfds_data_dir_that_is_not_a_directory_is_refused(tmp_path, made):
    """data.data_dir is used or refused: tfds would look nowhere else, but with TensorFlow
    installed it would create the directory and download the data set into it."""
    given = tmp_path / "typo"
    if made == "a file":
        given.write_text("")
    with pytest.raises(data.DataNotAvailableError, match=f"data.data_dir={given} (does not exist|is not a directory)"):
        data.load_in_memory("cifar10", data_dir=str(given))


def test_augmentation_shapes_determinism_and_effect():
    images = jax.random.randint(jax.random.PRNGKey(0), (16, 8, 8, 3), 0, 255).astype(np.uint8)
    key = jax.random.PRNGKey(1)
    out = data.augment_images(key, images, crop_padding=2, flip=True)
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out, data.augment_images(key, images, 2, True))
    assert not np.array_equal(out, data.augment_images(jax.random.PRNGKey(2), images, 2, True))
    np.testing.assert_array_equal(data.augment_images(key, images, 0, False), images)
    flipped = np.asarray(data.augment_images(key, images, 0, True))
    for i in range(16):  # each image is itself or its mirror
        assert np.array_equal(flipped[i], images[i]) or np.array_equal(flipped[i], np.asarray(images[i])[:, ::-1])
    x = data.normalize(images, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
    assert x.dtype == np.float32 and abs(float(x.max()) - 2.0) < 0.05


def test_imagenet_stream_batches_are_resumable_and_padded():
    from cka_jax.train.imagenet_stream import ImageNetStream
    from cka_jax.workdir.config import base_config

    config = base_config()
    config.data.name, config.data.image_size, config.data.num_workers = "imagenet2012", 24, 2
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        stream = ImageNetStream(config)
        batches = stream.train_batches(start_step=0, batch_size=8)
        first = [next(batches) for _ in range(4)]  # crosses the epoch boundary (2 steps/epoch)
        resumed = next(stream.train_batches(start_step=3, batch_size=8))
        test = list(stream.test_batches(8))
    assert first[0][0].shape == (8, 24, 24, 3) and first[0][0].dtype == np.uint8
    np.testing.assert_array_equal(resumed[0], first[3][0])
    np.testing.assert_array_equal(resumed[1], first[3][1])
    assert not np.array_equal(first[0][0], first[2][0])  # reshuffled, re-augmented
    assert [len(b[1]) for b in test] == [8, 8, 8] and [b[2].sum() for b in test] == [8, 8, 4]


# --- the data set registry and the data on devices ---------------------------------------------


def _loaded(name):
    """What loading `name` gives: (num_classes, image shape, train labels, test labels)."""
    if name == "imagenet2012":
        from cka_jax.train.imagenet_stream import ImageNetStream
        from cka_jax.workdir.config import base_config

        config = base_config()
        config.data.name, config.data.image_size, config.data.num_workers = name, 24, 1
        stream = ImageNetStream(config)
        images, labels = next(stream.train_batches(0, 4))
        return None, images.shape[1:], labels, next(stream.test_batches(4))[1]
    arrays = data.load_in_memory(name)
    return arrays.num_classes, arrays.image_shape, arrays.train_labels, arrays.test_labels


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "fashion_mnist" else n for n in data.DATASETS],  # reads its files
)
def test_dataset_info_matches_what_its_loader_gives(name):
    """Classes, image shape, kind and splits (the loaders read info.splits) of every data set."""
    info = data.dataset(name)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        num_classes, image_shape, train_labels, test_labels = _loaded(name)
    assert info.name == name and info.streamed == (info.load is None)
    assert info.image_shape(24) == image_shape
    assert num_classes in (None, info.num_classes)
    for labels in (train_labels, test_labels):
        assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < info.num_classes
    assert (info.load is not None) != info.streamed


def test_dataset_class_names():
    assert data.dataset("digits").class_names() == [str(c) for c in range(10)]
    wordnet_ids = data.dataset("imagenet2012").class_names()
    assert len(wordnet_ids) == 1000 and wordnet_ids[0] == "n01440764" and len(set(wordnet_ids)) == 1000
    for name in ("cifar10", "cifar100"):  # tfds's names where it knows them here, else the indices
        names = tfds.builder(name).info.features["label"].names
        assert data.dataset(name).class_names() == names
        assert len(names) == data.dataset(name).num_classes
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        data.dataset("mnist")


def _inputs(name, **data_fields):
    from cka_jax.train import device_batches as inputs
    from cka_jax.train import population
    from cka_jax.workdir.config import base_config

    config = base_config()
    config.data.name, config.train.batch_size, config.train.eval_batch_size = name, 4, 8
    for field, value in data_fields.items():
        config.data[field] = value
    return inputs.open_inputs(config, population.make_layout(1, "loop", jax.devices()[:1]).replicated)


def test_both_kinds_of_data_set_give_device_batches_step_by_step():
    """One iterator of device batches per epoch, from any step on: held in memory, every step gets
    the whole training set (it picks its own batch); streamed, the batches a resumed run reads go
    on exactly where the interrupted one stopped."""
    in_memory = _inputs("digits", fraction=0.01)  # 14 training images: 3 steps of 4
    assert (in_memory.num_train, in_memory.batch_size, in_memory.steps_per_epoch) == (14, 4, 3)
    batches = list(in_memory.batches(1, 3))
    assert len(batches) == 2 and batches[0][0].shape == (14, 8, 8, 1) and batches[1][1].shape == (14,)
    assert all(isinstance(a, jax.Array) for batch in batches for a in batch)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        streamed = _inputs("imagenet2012", image_size=16, num_workers=1)
        assert (streamed.num_train, streamed.steps_per_epoch) == (12, 3)
        run = [b for epoch in ((0, 3), (3, 5)) for b in streamed.batches(*epoch)]  # epochs 1, 2
        resumed = list(_inputs("imagenet2012", image_size=16, num_workers=1).batches(4, 6))
        test_labels = np.concatenate([labels for _, labels in streamed.eval_set.batches()])
    assert len(run) == 5 and run[0][0].shape == (4, 16, 16, 3) and streamed.mean.shape == (3,)
    np.testing.assert_array_equal(resumed[0][0], run[4][0])
    np.testing.assert_array_equal(resumed[0][1], run[4][1])
    assert len(test_labels) == streamed.eval_set.num_examples == 12
