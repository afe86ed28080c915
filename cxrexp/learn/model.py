"""The CNN: small conv blocks, a dense head, a logit and a sigmoid probability.

Built with the functional API (not ``keras.Sequential``): a Sequential model reloaded by Keras 3
has no symbolic input graph through which Grad-CAM can take gradients, while a functional one keeps
``block{i}_conv`` and ``logit`` reachable after ``keras.models.load_model``. Every layer is a
built-in Keras layer, so a saved ``.keras`` file loads in a process that never imports cxrexp.
"""

from __future__ import annotations

from typing import Sequence

import keras

from cxrexp.config import TrainConfig
from cxrexp.layer_names import INPUT_NAME, LOGIT_NAME, PROBABILITY_NAME

# Offsets keep the initialiser seeds of different layer kinds apart, so two layers of the same
# shape (e.g. two dense layers of 64 units) never start from identical weights.
_DENSE_SEED_OFFSET = 1000
_DROPOUT_SEED_OFFSET = 2000
_LOGIT_SEED_OFFSET = 3000



def conv_block(x, filters: int, index: int, seed: int, batch_norm: bool = False):
    """Conv2D 3x3 ('same', ReLU) [then BatchNorm] then MaxPool 2x2: halves the spatial size (floor).

    ``x``: a symbolic tensor (B, H, W, C). Layer names ``block{index}_conv`` / ``block{index}_bn`` /
    ``block{index}_pool``; the conv layer includes its ReLU, so Grad-CAM reads the rectified feature
    map. Batch norm sits after the ReLU so that stays true.
    """
    if filters < 1:
        raise ValueError(f"conv block {index}: filters={filters} must be a positive integer")
    x = keras.layers.Conv2D(
        filters,
        kernel_size=3,
        padding="same",
        activation="relu",
        kernel_initializer=keras.initializers.HeNormal(seed=seed + index),
        bias_initializer="zeros",
        name=f"block{index}_conv",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"block{index}_bn")(x)
    return keras.layers.MaxPooling2D(pool_size=2, name=f"block{index}_pool")(x)


def max_conv_blocks(image_size: int) -> int:
    """How many 2x2 pools an ``image_size`` image survives before its side would reach 0."""
    blocks, side = 0, image_size
    while side // 2 >= 1:
        side //= 2
        blocks += 1
    return blocks


def build_cnn(
    image_size: int,
    filters: Sequence[int],
    dense: Sequence[int],
    dropout: float,
    seed: int,
    batch_norm: bool = False,
) -> keras.Model:
    """A functional binary classifier.

    Input ``image``: float32 (B, S, S, 1) in [0, 1]. Output ``probability``: float32 (B, 1) in
    [0, 1] (1 = positive class), computed as sigmoid of the ``logit`` layer's (B, 1) output.
    Layers: ``block{i}_conv``[/``block{i}_bn``]/``block{i}_pool`` for i = 1..len(filters), ``flatten``, ``dropout``,
    ``dense{i}`` (ReLU) for i = 1..len(dense), ``logit``, ``probability``.

    Raises ValueError naming the values when ``filters`` is empty, a width is not positive,
    ``dropout`` is outside [0, 1), or there are more pool layers than the image size allows.
    """
    filters = tuple(int(f) for f in filters)
    dense = tuple(int(d) for d in dense)
    if image_size < 2:
        raise ValueError(f"image_size={image_size} must be at least 2 pixels")
    if not filters:
        raise ValueError("filters is empty: give at least one conv block, e.g. filters=(32, 64)")
    if any(f < 1 for f in filters) or any(d < 1 for d in dense):
        raise ValueError(f"filters={filters} and dense={dense} must hold positive integers only")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout={dropout} must be in [0, 1)")
    allowed = max_conv_blocks(image_size)
    if len(filters) > allowed:
        raise ValueError(
            f"filters={filters} asks for {len(filters)} conv blocks, but a {image_size}x{image_size} "
            f"image halves to 0 pixels after {allowed} 2x2 pools: use at most {allowed} blocks or "
            f"a larger image_size (>= {2 ** len(filters)})"
        )

    inputs = keras.Input(shape=(image_size, image_size, 1), dtype="float32", name=INPUT_NAME)
    x = inputs
    for index, width in enumerate(filters, start=1):
        x = conv_block(x, width, index, seed, batch_norm)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, seed=seed + _DROPOUT_SEED_OFFSET, name="dropout")(x)
    for index, units in enumerate(dense, start=1):
        x = keras.layers.Dense(
            units,
            activation="relu",
            kernel_initializer=keras.initializers.HeNormal(seed=seed + _DENSE_SEED_OFFSET + index),
            name=f"dense{index}",
        )(x)
    logit = keras.layers.Dense(
        1,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed + _LOGIT_SEED_OFFSET),
        name=LOGIT_NAME,
    )(x)
    # float32 even under mixed precision: a probability in float16 saturates near 0 and 1.
    probability = keras.layers.Activation("sigmoid", dtype="float32", name=PROBABILITY_NAME)(logit)
    return keras.Model(inputs, probability, name="cxr_cnn")


def build_cnn_from_config(cfg: TrainConfig, image_size: int) -> keras.Model:
    """``build_cnn`` with the architecture fields of a ``TrainConfig``."""
    return build_cnn(image_size, cfg.filters, cfg.dense, cfg.dropout, cfg.seed, cfg.batch_norm)


__all__ = [
    "conv_block",
    "max_conv_blocks",
    "build_cnn",
    "build_cnn_from_config",
]
