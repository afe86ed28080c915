"""Class-weight schemes and the weighted binary cross-entropy reference.

How the weights reach training: ``class_weights`` turns the TRAINING labels into ``{0: w0, 1: w1}``;
``cxrexp.dataset.make_dataset(..., weights=...)`` attaches ``w[y]`` to every sample as a Keras
per-sample weight; the model is compiled with Keras' built-in ``BinaryCrossentropy``. No custom
loss object is ever compiled into the model, so a saved ``.keras`` file holds only built-in
objects and loads in a fresh process without importing cxrexp (a custom loss would have to be
registered there first).

With Keras 3's default reduction ``"sum_over_batch_size"`` the batch loss is
``sum_i w[y_i] * bce_i / batch_size``, i.e. exactly ``weighted_bce`` below; the epoch loss is the
batch losses averaged with the batch sizes as weights, i.e. ``weighted_bce`` over the whole split.
(During training Keras reads the logit behind the sigmoid output, so it does not clip; the two
agree except where a probability is within ``eps`` of 0 or 1.) ``tests/test_losses.py`` checks it.
"""

from __future__ import annotations

import numpy as np

from cxrexp.config import CLASS_WEIGHT_SCHEMES


def _class_counts(labels: np.ndarray) -> tuple[int, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be 0/1 (1 = positive class), found values {sorted(values)}")
    n_positive = int(np.count_nonzero(labels == 1))
    n_negative = int(labels.size - n_positive)
    if n_positive == 0 or n_negative == 0:
        raise ValueError(
            f"class weights need both classes in the training labels, got {n_negative} negatives "
            f"and {n_positive} positives: check the split (val_frac/test_frac, seed) or the data"
        )
    return n_negative, n_positive


def class_weights(labels: np.ndarray, scheme: str, beta: float = 0.999) -> dict[int, float]:
    """Per-class loss weights ``{0: w0, 1: w1}`` from the TRAINING labels (int 0/1, shape (n,)).

    With ``n0``/``n1`` the class counts and ``n = n0 + n1``:

    - ``"none"``: ``{0: 1, 1: 1}``.
    - ``"inverse"``: each class weighted by the OTHER class's frequency, ``w0 = n1/n``,
      ``w1 = n0/n`` (the published experiment's scheme; the weights sum to 1).
    - ``"balanced"``: ``w_c = n / (2 n_c)`` (scikit-learn's "balanced"; mean sample weight is 1).
    - ``"effective"``: ``w_c = (1 - beta) / (1 - beta**n_c)`` (inverse "effective number of
      samples", Cui et al. 2019), rescaled so the two weights sum to 2; ``beta`` in [0, 1).
      ``beta = 0`` gives equal weights, ``beta -> 1`` approaches inverse class frequency.

    Raises ValueError for an unknown scheme, labels other than 0/1, or a class with no samples.
    """
    if scheme not in CLASS_WEIGHT_SCHEMES:
        raise ValueError(f"class_weight scheme {scheme!r} is not one of {CLASS_WEIGHT_SCHEMES}")
    n_negative, n_positive = _class_counts(labels)
    n = n_negative + n_positive
    counts = np.array([n_negative, n_positive], dtype=np.float64)
    if scheme == "none":
        weights = np.ones(2)
    elif scheme == "inverse":
        weights = counts[::-1] / n
    elif scheme == "balanced":
        weights = n / (2.0 * counts)
    else:  # effective
        if not 0 <= beta < 1:
            raise ValueError(f"effective_beta={beta} must be in [0, 1)")
        # 1 - beta**n_c via expm1/log keeps precision when beta is close to 1 (e.g. 0.9999).
        effective_numbers = -np.expm1(counts * np.log(beta)) if beta > 0 else np.ones(2)
        weights = (1.0 - beta) / effective_numbers
        weights = weights * 2.0 / weights.sum()
    return {0: float(weights[0]), 1: float(weights[1])}


def weighted_bce(
    y_true: np.ndarray,
    probability: np.ndarray,
    weights: dict[int, float],
    eps: float = 1e-7,
) -> float:
    """Mean over samples of ``-w[y] * (y log p + (1 - y) log(1 - p))``: the numpy reference.

    ``y_true``: 0/1, any shape; ``probability``: same number of elements, in [0, 1], clipped to
    ``[eps, 1 - eps]`` like Keras does (Keras' default epsilon is 1e-7). ``weights``: ``{0: w0, 1: w1}``.
    Returns a float in nats; ValueError for empty or mismatched inputs, NaN probabilities or
    labels other than 0/1.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(probability, dtype=np.float64).ravel()
    if y.size == 0 or y.size != p.size:
        raise ValueError(f"y_true has {y.size} values and probability {p.size}: need the same, > 0")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"y_true must be 0/1, found values {np.unique(y)[:10].tolist()}")
    if np.isnan(p).any() or p.min() < 0 or p.max() > 1:
        raise ValueError("probability must be in [0, 1] without NaN (did training diverge?)")
    if set(weights) != {0, 1}:
        raise ValueError(f"weights must have keys 0 and 1, got {sorted(weights)}")
    p = np.clip(p, eps, 1.0 - eps)
    sample_weight = np.where(y == 1, weights[1], weights[0])
    per_sample = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return float(np.mean(sample_weight * per_sample))


__all__ = ["class_weights", "weighted_bce"]
