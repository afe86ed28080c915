"""The search space: every ``trial.suggest_*`` of the project (optuna-examples' one function)."""

from __future__ import annotations

from dataclasses import replace

import optuna

from cxrexp.config import CLASS_WEIGHT_SCHEMES, TrainConfig

TINY_IMAGE_SIZE = 64  # at or below this, narrower first blocks suffice
TINY_BASE_WIDTHS = (8, 16, 32)
BASE_WIDTHS = (16, 32, 64)
MIN_BLOCKS, MAX_BLOCKS = 3, 5
MAX_FILTERS = 256  # the published model's widest block; wider is slow on CPU for little gain
DROPOUT_RANGE = (0.0, 0.5)
LEARNING_RATE_RANGE = (1e-4, 3e-3)
SEARCHED_FIELDS = ("filters", "dropout", "class_weight", "learning_rate")


def base_widths(image_size: int) -> tuple[int, ...]:
    """Choices for the first block's filter count: narrower for tiny (<= 64 px) images."""
    return TINY_BASE_WIDTHS if image_size <= TINY_IMAGE_SIZE else BASE_WIDTHS


def depth_range(image_size: int) -> tuple[int, int]:
    """(fewest, most) conv blocks: 3-5, capped by the pools the image survives, never below 2."""
    from cxrexp.learn.model import max_conv_blocks

    cap = max_conv_blocks(image_size)
    low = max(2, min(MIN_BLOCKS, cap))
    return low, max(low, min(MAX_BLOCKS, cap))


def doubling_filters(base_width: int, n_blocks: int) -> tuple[int, ...]:
    """``(16, 4)`` -> ``(16, 32, 64, 128)``; each width capped at ``MAX_FILTERS``."""
    return tuple(min(base_width * 2**i, MAX_FILTERS) for i in range(n_blocks))


def suggest_config(trial: optuna.trial.BaseTrial, base: TrainConfig, image_size: int) -> TrainConfig:
    """The whole search space: every ``trial.suggest_*`` of the project is here.

    Searched: ``base_width`` (first block's filters, doubling per block), ``n_blocks``
    (``depth_range``), ``dropout`` in [0, 0.5], ``class_weight`` (a scheme name) and a
    log-uniform ``learning_rate`` in [1e-4, 3e-3]. Everything else comes from ``base``.
    """
    low, high = depth_range(image_size)
    base_width = trial.suggest_categorical("base_width", base_widths(image_size))
    n_blocks = trial.suggest_int("n_blocks", low, high)
    dropout = trial.suggest_float("dropout", *DROPOUT_RANGE)
    class_weight = trial.suggest_categorical("class_weight", CLASS_WEIGHT_SCHEMES)
    learning_rate = trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True)
    return replace(
        base,
        filters=doubling_filters(int(base_width), n_blocks),
        dropout=float(dropout),
        class_weight=str(class_weight),
        learning_rate=float(learning_rate),
    )
