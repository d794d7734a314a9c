"""Data: digits split, fraction subsets, random labels, the tfds path, augmentation."""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cka_jax.train import data


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
    assert 0.02 < np.mean(a.train_labels == clean.train_labels) < 0.25   # ~1/10 agree by chance
    assert set(np.unique(a.train_labels)) == set(range(10))
    np.testing.assert_array_equal(a.test_labels, full.test_labels)    # test set untouched


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
        assert (np.array_equal(flipped[i], images[i]) or
                np.array_equal(flipped[i], np.asarray(images[i])[:, ::-1]))
    x = data.normalize(images, np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32))
    assert x.dtype == np.float32 and abs(float(x.max()) - 2.0) < 0.05


def test_imagenet_stream_batches_are_resumable_and_padded():
    from cka_jax.train.imagenet_stream import ImageNetStream
    from cka_jax.train.config import base_config
    config = base_config()
    config.data.name, config.data.image_size, config.data.num_workers = "imagenet2012", 24, 2
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        stream = ImageNetStream(config)
        batches = stream.train_batches(start_step=0, batch_size=8)
        first = [next(batches) for _ in range(4)]   # crosses the epoch boundary (2 steps/epoch)
        resumed = next(stream.train_batches(start_step=3, batch_size=8))
        test = list(stream.test_batches(8))
    assert first[0][0].shape == (8, 24, 24, 3) and first[0][0].dtype == np.uint8
    np.testing.assert_array_equal(resumed[0], first[3][0])
    np.testing.assert_array_equal(resumed[1], first[3][1])
    assert not np.array_equal(first[0][0], first[2][0])          # reshuffled, re-augmented
    assert [len(b[1]) for b in test] == [8, 8, 8] and [b[2].sum() for b in test] == [8, 8, 4]
