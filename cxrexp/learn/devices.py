"""Where training runs: a ``tf.distribute`` strategy and, on GPUs, mixed precision.

``strategy_for("mirrored")`` is ``tf.distribute.MirroredStrategy`` over the local GPUs (with fewer
than two, the default strategy: one replica); ``"default"`` is TensorFlow's default strategy. ``TrainConfig.batch_size``
is **per replica**: the global batch is ``batch_size x replicas``, so a run on N GPUs takes N times
as many images per step and the same number of steps per epoch divided by N.

Mixed precision (``mixed_float16``) pays on GPUs with tensor cores and slows a CPU down, so on a
machine without a GPU it is not turned on, and ``mixed_precision`` says so.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import keras
import tensorflow as tf

from cxrexp.config import STRATEGIES

log = logging.getLogger(__name__)


def strategy_for(name: str) -> tf.distribute.Strategy:
    """The strategy ``name`` asks for. ``mirrored`` with fewer than two GPUs is one replica, which
    mirrors nothing: it is then the default strategy, so a CPU run of ``-P strategy=mirrored`` is
    the very run of the default (MirroredStrategy over one device still rewrites the input pipeline,
    and its first epochs came out measurably different on the same seed)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {STRATEGIES}")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy([g.name for g in gpus])
        log.info("strategy=mirrored with %d GPU(s): one replica, trained as the default strategy", len(gpus))
    return tf.distribute.get_strategy()


@contextlib.contextmanager
def mixed_precision(enabled: bool) -> Iterator[bool]:
    """``mixed_float16`` for the models built inside (yields whether it is on); the global policy is
    restored afterwards, so a later model in the same process is float32 again."""
    if not enabled:
        yield False
        return
    if not tf.config.list_physical_devices("GPU"):
        log.warning("mixed_precision=true ignored: no GPU here (float16 on a CPU is slower, not faster)")
        yield False
        return
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        yield True
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


__all__ = ["STRATEGIES", "mixed_precision", "strategy_for"]
