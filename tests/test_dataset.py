"""The tf.data pipeline: shapes, ranges, coverage, order, determinism, weights, augmentation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cxrexp.data.tfdata import (
    augment_batch,
    make_dataset,
    predict_probabilities,
    read_rows,
)

SIZE = 16
N_IMAGES = 60
# An unsorted subset of the rows, so position-in-split != row-in-file.
ROWS = np.array(
    [57, 3, 12, 40, 0, 21, 33, 8, 50, 19, 44, 27, 5, 36, 14, 59, 30, 1, 48, 25, 11, 38, 16], dtype=np.int64
)
LABELS = (ROWS % 4 == 0).astype(np.int64)  # 57->0, 12->1, 40->1, 0->1, ...
WEIGHTS = {0: 0.25, 1: 0.75}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Read-only memmap uint8 (60, 16, 16); image r is filled with the value 4 * r (row id readable)."""
    path = tmp_path_factory.mktemp("dataset") / "images.npy"
    pixels = np.repeat((4 * np.arange(N_IMAGES, dtype=np.uint8))[:, None, None], SIZE * SIZE, axis=1)
    np.save(path, pixels.reshape(N_IMAGES, SIZE, SIZE))
    return np.load(path, mmap_mode="r")


def _epoch(dataset):
    """One pass: (row ids decoded from the pixels, y, w or None, batch sizes)."""
    rows, ys, ws, sizes = [], [], [], []
    for batch in dataset:
        x = batch[0].numpy()
        rows.append(np.rint(x[:, 0, 0, 0] * 255 / 4).astype(np.int64))
        ys.append(batch[1].numpy()[:, 0])
        ws.append(batch[2].numpy() if len(batch) == 3 else None)
        sizes.append(x.shape[0])
    weights = None if ws[0] is None else np.concatenate(ws)
    return np.concatenate(rows), np.concatenate(ys), weights, sizes


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_batches_have_the_contract_shapes_dtypes_and_ranges(images, cache, weights):
    dataset = make_dataset(images, ROWS, LABELS, 5, shuffle=True, seed=1, weights=weights, cache=cache)
    batch = next(iter(dataset))
    assert len(batch) == (2 if weights is None else 3)
    x, y = batch[0], batch[1]
    assert x.dtype == tf.float32 and tuple(x.shape) == (5, SIZE, SIZE, 1)
    assert y.dtype == tf.float32 and tuple(y.shape) == (5, 1)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    assert set(np.unique(y.numpy())) <= {0.0, 1.0}
    if weights is not None:
        assert batch[2].dtype == tf.float32 and tuple(batch[2].shape) == (5,)
    # The static shape Keras sees when it builds the model.
    assert dataset.element_spec[0].shape.as_list() == [None, SIZE, SIZE, 1]


@pytest.mark.parametrize("cache", [True, False])
def test_every_row_once_per_epoch_with_its_label_and_weight(images, cache):
    label_of_row = dict(zip(ROWS.tolist(), LABELS.tolist()))
    dataset = make_dataset(images, ROWS, LABELS, 5, shuffle=True, seed=3, weights=WEIGHTS, cache=cache)
    epochs = [_epoch(dataset) for _ in range(2)]
    for rows, ys, ws, sizes in epochs:
        assert sorted(rows.tolist()) == sorted(ROWS.tolist())
        assert sizes == [5, 5, 5, 5, 3]  # 23 rows: the last batch is kept, smaller
        np.testing.assert_array_equal(ys, [label_of_row[r] for r in rows])
        np.testing.assert_allclose(ws, [WEIGHTS[label_of_row[r]] for r in rows])
    assert not np.array_equal(epochs[0][0], epochs[1][0]), "the order must change between epochs"


@pytest.mark.parametrize("cache", [True, False])
def test_without_shuffle_batches_follow_rows(images, cache):
    rows, ys, _, _ = _epoch(make_dataset(images, ROWS, LABELS, 4, shuffle=False, seed=0, cache=cache))
    np.testing.assert_array_equal(rows, ROWS)
    np.testing.assert_array_equal(ys, LABELS)


def test_same_seed_same_batches_and_cache_does_not_change_them(images):
    def orders(seed, cache):
        dataset = make_dataset(images, ROWS, LABELS, 4, shuffle=True, seed=seed, cache=cache)
        return [_epoch(dataset)[0] for _ in range(2)]

    reference = orders(7, cache=True)
    for again in (orders(7, cache=True), orders(7, cache=False)):
        for epoch_rows, reference_rows in zip(again, reference):
            np.testing.assert_array_equal(epoch_rows, reference_rows)
    assert not np.array_equal(orders(8, cache=True)[0], reference[0])


def test_read_rows_keeps_the_requested_order(images):
    rows = np.array([9, 2, 30, 2], dtype=np.int64)
    np.testing.assert_array_equal(read_rows(images, rows)[:, 0, 0], 4 * rows)


@pytest.mark.parametrize(
    ("rows", "labels", "batch_size", "message"),
    [
        (np.array([0, 60]), np.array([0, 1]), 2, "0..59"),
        (np.array([-1, 2]), np.array([0, 1]), 2, "0..59"),
        (np.array([0, 1]), np.array([0]), 2, "same shape"),
        (np.array([0, 1]), np.array([0, 2]), 2, "0/1"),
        (np.array([], dtype=np.int64), np.array([], dtype=np.int64), 2, "non-empty"),
        (np.array([0, 1]), np.array([0, 1]), 0, "batch_size"),
    ],
)
def test_bad_inputs_fail_clearly(images, rows, labels, batch_size, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(images, rows, labels, batch_size, shuffle=False, seed=0)


def test_non_uint8_images_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        make_dataset(
            np.zeros((2, 8, 8), np.float32), np.array([0, 1]), np.array([0, 1]), 2, shuffle=False, seed=0
        )


# ------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_images(tmp_path_factory):
    """uint8 (8, 32, 32): left half bright (200), right half dark (40), a brighter square in the centre."""
    pixels = np.full((8, 32, 32), 40, np.uint8)
    pixels[:, :, :16] = 200
    pixels[:, 12:20, 12:20] = 255
    path = tmp_path_factory.mktemp("augment") / "images.npy"
    np.save(path, pixels)
    return np.load(path, mmap_mode="r")


def _augmented_epochs(images, seed, n_epochs=2):
    rows = np.arange(images.shape[0], dtype=np.int64)
    labels = rows % 2
    dataset = make_dataset(images, rows, labels, 4, shuffle=False, seed=seed, augment=True)
    return [np.concatenate([x.numpy() for x, _ in dataset]) for _ in range(n_epochs)]


def test_augmentation_keeps_shape_and_range_and_changes_pixels(half_images):
    first_epoch, second_epoch = _augmented_epochs(half_images, seed=1)
    original = half_images[:, :, :, None] / 255.0
    assert first_epoch.shape == original.shape and first_epoch.dtype == np.float32
    assert first_epoch.min() >= 0.0 and first_epoch.max() <= 1.0
    assert not np.allclose(first_epoch, original, atol=1e-3), "augmentation did nothing"
    assert not np.allclose(first_epoch, second_epoch), "augmentation must differ between epochs"


def test_augmentation_is_deterministic_with_the_seed(half_images):
    reference = _augmented_epochs(half_images, seed=5)
    for epoch, reference_epoch in zip(_augmented_epochs(half_images, seed=5), reference):
        np.testing.assert_array_equal(epoch, reference_epoch)
    assert not np.allclose(_augmented_epochs(half_images, seed=6, n_epochs=1)[0], reference[0])


def test_augmentation_never_flips_left_right(half_images):
    # A left-right flip would put the bright half on the right; +-7 deg / +-5 % / +-7 % cannot.
    for epoch in _augmented_epochs(half_images, seed=2, n_epochs=3):
        left = epoch[:, :, :12, 0].mean(axis=(1, 2))
        right = epoch[:, :, 20:, 0].mean(axis=(1, 2))
        assert (left > right + 0.4).all()


def test_augmentation_stays_small():
    """The bright centre square's centroid moves at most by the shift range (+ a pixel of blur)."""
    x = np.zeros((64, 32, 32, 1), np.float32)
    x[:, 14:18, 14:18] = 1.0
    moved = augment_batch(tf.constant(x), tf.constant([3, 0], tf.int64)).numpy()[..., 0]
    # Brightness shifts the whole image by up to 0.1: measure the square as what stands out.
    mass = np.clip(moved - np.median(moved, axis=(1, 2), keepdims=True) - 0.2, 0, None)
    grid = np.arange(32)
    cy = (mass.sum(axis=2) * grid).sum(axis=1) / mass.sum(axis=(1, 2))
    cx = (mass.sum(axis=1) * grid).sum(axis=1) / mass.sum(axis=(1, 2))
    displacement = np.hypot(cy - 15.5, cx - 15.5)
    assert displacement.max() <= 0.05 * 32 * np.sqrt(2) + 1.0
    assert displacement.max() > 0.3, "no image was shifted"
    offsets = np.median(moved, axis=(1, 2))
    assert np.abs(offsets).max() <= 0.1 + 1e-6


# ------------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------------


def test_predict_probabilities_follow_rows(images):
    # A "model" that outputs each image's mean pixel: image r -> 4 r / 255.
    inputs = keras.Input((SIZE, SIZE, 1), name="image")
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    probabilities = predict_probabilities(model, images, ROWS, batch_size=4)
    assert probabilities.dtype == np.float32 and probabilities.shape == (ROWS.size,)
    np.testing.assert_allclose(probabilities, 4 * ROWS / 255.0, atol=1e-6)


class CountingArray(np.ndarray):
    """An ndarray that counts how often it is indexed (to see WHEN the pipeline reads pixels)."""

    reads = 0

    def __getitem__(self, key):
        CountingArray.reads += 1
        return self.view(np.ndarray)[key]


@pytest.mark.parametrize(("limit", "reads_at_build"), [(10**9, True), (0, False)])
def test_cache_none_caches_only_splits_below_the_limit(images, monkeypatch, limit, reads_at_build):
    import cxrexp.data.tfdata as dataset_module

    monkeypatch.setattr(dataset_module, "CACHE_LIMIT_BYTES", limit)
    counting = np.asarray(images).view(CountingArray)
    CountingArray.reads = 0
    dataset = make_dataset(counting, ROWS, LABELS, 5, shuffle=False, seed=0)
    assert (CountingArray.reads > 0) == reads_at_build
    reads_before = CountingArray.reads
    rows, _, _, _ = _epoch(dataset)
    np.testing.assert_array_equal(rows, ROWS)
    # A cached split is never read again; a streamed one is read batch by batch.
    assert (CountingArray.reads == reads_before) == reads_at_build
