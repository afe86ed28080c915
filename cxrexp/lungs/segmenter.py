"""The lung segmenter: a small Keras U-Net on grey X-rays, trained from scratch (no MLflow).

Input ``image`` float32 (S, S, 1) in [0, 1] (the X-ray resized to S, no enhancement: the segmenter
must work on any hospital's exposure); output ``lung`` float32 (S, S, 1), the probability of lung
per pixel. ``predict_masks`` turns any-size uint8 images into bool masks at each image's own size
(the probability map is resized to the image, then thresholded: never the image to the mask).

Loss: BCE + soft Dice (Dice alone is unstable early; BCE alone under-weights the lung boundary).
Early stopping on the validation Dice; the best epoch's weights are restored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import keras
import numpy as np

from cxrexp.config import SEGMENTER_CONVS

SEGMENTER_INPUT = "image"
SEGMENTER_OUTPUT = "lung"
THRESHOLD = 0.5
_SMOOTH = 1.0


def _conv_pair(x, filters: int, name: str, seed: int, conv: str = "standard"):
    for i in (1, 2):
        # The network's first convolution stays standard under "separable": a depthwise pass over one
        # grey channel saves nothing.
        if conv == "separable" and x.shape[-1] > 1:
            init = keras.initializers.HeNormal(seed=seed + i)
            x = keras.layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}",
                                             depthwise_initializer=init, pointwise_initializer=init)(x)
        else:
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}",
                                    kernel_initializer=keras.initializers.HeNormal(seed=seed + i))(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(image_size: int, base_filters: int = 16, depth: int = 4, seed: int = 42,
               conv: str = "standard") -> keras.Model:
    """U-Net with ``depth`` 2x2 poolings (``image_size`` must be divisible by 2**depth), filters
    ``base_filters * 2**level``, skip connections by concatenation, sigmoid output ``lung``; ``conv``
    one of ``SEGMENTER_CONVS``."""
    if image_size % (2 ** depth):
        raise ValueError(f"image_size={image_size} must be divisible by 2**depth = {2 ** depth}")
    if conv not in SEGMENTER_CONVS:
        raise ValueError(f"conv={conv!r} must be one of {', '.join(SEGMENTER_CONVS)}")
    inputs = keras.Input((image_size, image_size, 1), name=SEGMENTER_INPUT)
    x, skips = inputs, []
    for level in range(depth):
        x = _conv_pair(x, base_filters * 2 ** level, f"down{level}", seed + 10 * level, conv)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_pair(x, base_filters * 2 ** depth, "bottom", seed + 100, conv)
    for level in reversed(range(depth)):
        x = keras.layers.Conv2DTranspose(base_filters * 2 ** level, 2, strides=2, name=f"up{level}",
                                         kernel_initializer=keras.initializers.HeNormal(seed=seed + 200 + level))(x)
        x = keras.layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_pair(x, base_filters * 2 ** level, f"dec{level}", seed + 300 + 10 * level, conv)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name=SEGMENTER_OUTPUT,
                                  kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 999))(x)
    return keras.Model(inputs, outputs, name="lung_unet")


def soft_dice(y_true, y_pred):
    """Mean soft Dice over the batch (differentiable), in [0, 1]."""
    ops = keras.ops
    axes = (1, 2, 3)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return ops.mean((2.0 * intersection + _SMOOTH) / (total + _SMOOTH))


def bce_dice_loss(y_true, y_pred):
    return keras.losses.binary_crossentropy(y_true, y_pred) + (1.0 - soft_dice(y_true, y_pred))


def to_input(images: list[np.ndarray] | np.ndarray, image_size: int) -> np.ndarray:
    """uint8 grey images of any sizes -> float32 (N, S, S, 1) in [0, 1] (area resize, no enhancement)."""
    out = np.empty((len(images), image_size, image_size, 1), np.float32)
    for i, image in enumerate(images):
        resized = image if image.shape == (image_size, image_size) else cv2.resize(
            image, (image_size, image_size), interpolation=cv2.INTER_AREA)
        out[i, :, :, 0] = resized.astype(np.float32) / 255.0
    return out


def to_target(masks: list[np.ndarray] | np.ndarray, image_size: int) -> np.ndarray:
    """bool masks of any sizes -> float32 (N, S, S, 1) in {0, 1} (resized, then thresholded at 0.5)."""
    out = np.empty((len(masks), image_size, image_size, 1), np.float32)
    for i, mask in enumerate(masks):
        resized = cv2.resize(mask.astype(np.float32), (image_size, image_size), interpolation=cv2.INTER_AREA)
        out[i, :, :, 0] = resized >= 0.5
    return out


@dataclass
class SegmenterResult:
    """``model`` with the best epoch's weights; ``history`` per-epoch ``loss``, ``dice``, ``val_loss``,
    ``val_dice``; ``best_epoch`` 0-based; ``best_val_dice`` (soft Dice at the model's size)."""

    model: keras.Model
    history: dict[str, list[float]]
    best_epoch: int
    best_val_dice: float


def train_segmenter(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                    epochs: int, batch_size: int = 8, learning_rate: float = 1e-3, patience: int = 4,
                    base_filters: int = 16, depth: int = 4, seed: int = 42, augment: bool = True,
                    conv: str = "standard", callbacks: tuple = (), verbose: int = 0) -> SegmenterResult:
    """Fit a U-Net on float32 (N, S, S, 1) inputs and {0, 1} targets (``to_input``/``to_target``)."""
    keras.utils.set_random_seed(seed)
    model = build_unet(train_x.shape[1], base_filters, depth, seed, conv)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=bce_dice_loss, metrics=[soft_dice])
    x, y = train_x, train_y
    if augment:  # left-right flips: lungs are near-symmetric, and it doubles a small mask set
        x, y = np.concatenate([x, x[:, :, ::-1]]), np.concatenate([y, y[:, :, ::-1]])
    stopper = keras.callbacks.EarlyStopping(monitor="val_soft_dice", mode="max", patience=patience,
                                            restore_best_weights=True)
    fitted = model.fit(x, y, validation_data=(val_x, val_y), epochs=epochs, batch_size=batch_size,
                       shuffle=True, callbacks=[stopper, *callbacks], verbose=verbose)
    raw = fitted.history
    history = {"loss": raw["loss"], "dice": raw["soft_dice"], "val_loss": raw["val_loss"], "val_dice": raw["val_soft_dice"]}
    best = int(np.nanargmax(history["val_dice"]))
    if not all(math.isfinite(v) for v in history["loss"]):
        raise RuntimeError("the segmenter's loss became NaN or infinite: lower the learning rate")
    return SegmenterResult(model, history, best, float(history["val_dice"][best]))


def predict_probability(model: keras.Model, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """float32 (N, S, S) lung probabilities at the model's size for uint8 grey images of any sizes."""
    size = int(model.inputs[0].shape[1])
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_input(images[start:start + batch_size], size)
        out.append(np.asarray(model.predict_on_batch(batch))[..., 0])
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def masks_at_image_size(probabilities: np.ndarray, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Each probability map resized (bilinear) to its image's (h, w), then thresholded: bool masks."""
    return [cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) >= THRESHOLD
            for p, (h, w) in zip(probabilities, shapes)]


def predict_masks(model: keras.Model, images: list[np.ndarray], batch_size: int = 16) -> list[np.ndarray]:
    """bool lung masks, each at its own image's size, for uint8 grey images of any sizes."""
    return masks_at_image_size(predict_probability(model, images, batch_size), [im.shape for im in images])


__all__ = [
    "SEGMENTER_CONVS",
    "SEGMENTER_INPUT",
    "SEGMENTER_OUTPUT",
    "SegmenterResult",
    "THRESHOLD",
    "bce_dice_loss",
    "build_unet",
    "masks_at_image_size",
    "predict_masks",
    "predict_probability",
    "soft_dice",
    "to_input",
    "to_target",
    "train_segmenter",
]
