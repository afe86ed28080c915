"""The tf.data input pipeline over a prepared dataset's images.

Inputs are what ``cxrexp.store`` hands out: ``images``, a read-only uint8 (N, S, S) array (normally
a ``numpy.memmap`` of ``images.npy``), and per split ``rows`` (int64 indices into ``images``) and
``labels`` (int64 0/1, 1 = positive class).

The pipeline shuffles and batches POSITIONS 0..n-1 into the split (cheap int64s, so the shuffle
buffer can hold the whole split), then turns each batch of positions into pixels through
``tf.numpy_function``:

- ``cache=True``: the split's uint8 pixels are read once (front to back) into RAM and a batch
  indexes that array;
- ``cache=False``: a batch is read from the memmap (rows sorted within the batch so the file is
  read front to back, then put back in batch order).

Both give identical batches for the same seed. ``cache=None`` caches when the split's pixels fit
in ``CACHE_LIMIT_BYTES`` (2 GiB). Measured (3,000 images of 224 px, batch 32, 2 busy cores): a
shuffled epoch costs 0.1-0.3 s in RAM, 0.15-0.3 s from a memmap in the page cache, and 0.1-0.5 s
with ``from_tensor_slices`` over the pixels (whose first epoch fills a shuffle buffer of images,
a second copy of the split); all far below one training epoch. A ``tf.gather`` from the split as a
captured ``tf.constant`` was no faster and peaked at 4 copies of the split in memory, so the
cache is a plain NumPy array (one copy). Augmentation dominates: about 1 ms per 224 px image.

Randomness (shuffle order, augmentation) comes from ``seed`` together with TensorFlow's global
seed, which ``keras.utils.set_random_seed`` sets: with both fixed the batches are reproducible, and
the order and augmentation change from epoch to epoch.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

CACHE_LIMIT_BYTES = 2 * 1024**3

# Augmentation ranges (train split only). Small on purpose: a chest X-ray is acquired in a
# standard position, so large geometric changes would produce images the model never meets.
MAX_ROTATION_DEGREES = 7.0
MAX_SHIFT_FRACTION = 0.05
MAX_ZOOM_FRACTION = 0.07
MAX_BRIGHTNESS_DELTA = 0.1
# No left-right flip: the anatomy is not symmetric (heart on the left, liver on the right, the
# aortic knob, side markers), so a flipped radiograph is not a plausible radiograph.


def _check_split(images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be uint8 (N, S, S), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"rows must be a non-empty 1-D integer array, got {rows.dtype} {rows.shape}")
    if rows.min() < 0 or rows.max() >= images.shape[0]:
        raise ValueError(
            f"rows must index images (0..{images.shape[0] - 1}), got {rows.min()}..{rows.max()}: "
            "do the rows come from the same prepared dataset as the images?"
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != rows.shape:
            raise ValueError(f"labels {labels.shape} and rows {rows.shape} must have the same shape")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be 0/1, found {np.unique(labels)[:10].tolist()}")
    return rows.astype(np.int64)


def read_rows(images: np.ndarray, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """``images[rows]`` as an in-memory uint8 (len(rows), S, S) array, in the order of ``rows``.

    The rows are read in ascending order (a front-to-back pass over a memmap) and then put back,
    ``chunk`` rows at a time so reading a whole split never holds a second full copy.
    """
    order = np.argsort(rows, kind="stable")
    out = np.empty((rows.size,) + images.shape[1:], dtype=np.uint8)
    for start in range(0, rows.size, chunk):
        part = order[start : start + chunk]
        out[part] = images[rows[part]]
    return out


def _pixel_reader(images: np.ndarray, rows: np.ndarray, cache: bool):
    """A function: int64 positions (B,) into ``rows`` -> uint8 (B, S, S) tensor."""
    size = images.shape[1]
    if cache:
        # The split read once, front to back, into RAM; batches then index it in order.
        split_pixels = read_rows(images, rows)

        def read_positions(positions: np.ndarray) -> np.ndarray:
            return split_pixels[positions]

    else:

        def read_positions(positions: np.ndarray) -> np.ndarray:
            return read_rows(images, rows[positions])

    def read(positions):
        pixels = tf.numpy_function(read_positions, [positions], tf.uint8, stateful=False)
        pixels.set_shape([None, size, size])
        return pixels

    return read


def augment_batch(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random small rotation, shift, zoom and brightness change; no flip.

    ``x``: float32 (B, S, S, 1) in [0, 1]; ``seed``: int shape (2,) for the stateless draws (the
    same seed gives the same output). Returns float32 (B, S, S, 1) in [0, 1]. Each image gets its
    own rotation in +-7 degrees, shift in +-5 % of the side per axis, zoom in +-7 % and brightness
    offset in +-0.1; borders are filled by reflection.
    """
    batch = tf.shape(x)[0]
    side = tf.cast(tf.shape(x)[1], tf.float32)
    draws = tf.random.stateless_uniform([batch, 5], seed=seed, minval=-1.0, maxval=1.0)
    angle = draws[:, 0] * (MAX_ROTATION_DEGREES * math.pi / 180.0)
    shift_x = draws[:, 1] * MAX_SHIFT_FRACTION * side
    shift_y = draws[:, 2] * MAX_SHIFT_FRACTION * side
    zoom = 1.0 + draws[:, 3] * MAX_ZOOM_FRACTION
    brightness = draws[:, 4] * MAX_BRIGHTNESS_DELTA

    # The transform maps each OUTPUT pixel to where it is read in the input:
    # input = M (output - centre - shift) + centre, with M = rotation(angle) / zoom.
    centre = (side - 1.0) / 2.0
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = centre - (a0 * (centre + shift_x) + a1 * (centre + shift_y))
    b2 = centre - (b0 * (centre + shift_x) + b1 * (centre + shift_y))
    zeros = tf.zeros_like(angle)
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    return tf.clip_by_value(moved + brightness[:, None, None, None], 0.0, 1.0)


def make_dataset(
    images: np.ndarray,
    rows: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    augment: bool = False,
    weights: dict[int, float] | None = None,
    cache: bool | None = None,
) -> tf.data.Dataset:
    """Batches of one split for ``model.fit`` / ``evaluate``.

    Yields ``(x, y)`` or, when ``weights`` (``{0: w0, 1: w1}``) is given, ``(x, y, w)``:
    ``x`` float32 (B, S, S, 1) in [0, 1], ``y`` float32 (B, 1) in {0, 1}, ``w`` float32 (B,) =
    ``weights[y]``. Every row appears exactly once per epoch (the last batch may be smaller);
    without ``shuffle`` the batches follow the order of ``rows``. ``augment`` is for the training
    split only (see ``augment_batch``). ``cache``: see the module docstring.
    """
    rows = _check_split(images, rows, labels)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if weights is not None and set(weights) != {0, 1}:
        raise ValueError(f"weights must have keys 0 and 1, got {sorted(weights)}")
    if cache is None:
        cache = rows.size * images.shape[1] * images.shape[2] <= CACHE_LIMIT_BYTES
    read = _pixel_reader(images, rows, cache)
    split_labels = tf.constant(np.asarray(labels, dtype=np.int64))
    weight_table = None if weights is None else tf.constant([weights[0], weights[1]], tf.float32)

    positions = tf.data.Dataset.range(rows.size)
    if shuffle:
        positions = positions.shuffle(rows.size, seed=seed, reshuffle_each_iteration=True)
    batches = positions.batch(batch_size)
    if augment:
        # One draw per batch, different each epoch; the augmentation itself is stateless.
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    else:
        batch_seeds = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat()
    batches = tf.data.Dataset.zip(batches, batch_seeds)

    def load(batch_positions, batch_seed):
        x = tf.cast(read(batch_positions), tf.float32)[..., None] / 255.0
        if augment:
            x = augment_batch(x, tf.stack([batch_seed, tf.constant(0, tf.int64)]))
        label = tf.gather(split_labels, batch_positions)
        y = tf.cast(label, tf.float32)[:, None]
        if weight_table is None:
            return x, y
        return x, y, tf.gather(weight_table, label)

    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(
        tf.data.AUTOTUNE
    )


def make_image_dataset(images: np.ndarray, rows: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Images only, in the order of ``rows``: float32 (B, S, S, 1) in [0, 1], streamed from disk."""
    rows = _check_split(images, rows, None)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    read = _pixel_reader(images, rows, cache=False)
    return (
        tf.data.Dataset.range(rows.size)
        .batch(batch_size)
        .map(
            lambda positions: tf.cast(read(positions), tf.float32)[..., None] / 255.0,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def predict_probabilities(
    model: keras.Model, images: np.ndarray, rows: np.ndarray, batch_size: int
) -> np.ndarray:
    """The model's positive-class probability for ``images[rows]``: float32 (len(rows),) in [0, 1]."""
    predictions = model.predict(make_image_dataset(images, rows, batch_size), verbose=0)
    return np.asarray(predictions, dtype=np.float32).reshape(-1)


__all__ = [
    "CACHE_LIMIT_BYTES",
    "MAX_ROTATION_DEGREES",
    "MAX_SHIFT_FRACTION",
    "MAX_ZOOM_FRACTION",
    "MAX_BRIGHTNESS_DELTA",
    "read_rows",
    "augment_batch",
    "make_dataset",
    "make_image_dataset",
    "predict_probabilities",
]
