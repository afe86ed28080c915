"""TensorFlow's C++ start-up lines (oneDNN, CUDA stubs, cuInit), kept out of the console unless asked for.

Why not only ``TF_CPP_MIN_LOG_LEVEL``: TensorFlow 2.21 writes these lines through absl before absl's
logging is initialised, and such lines go to stderr whatever that variable says. So the stderr file
descriptor points at /dev/null while TensorFlow loads and looks for its devices, and is restored at
once; a Python error raised by the import still reaches the console (it is printed after the
restore). ``CXREXP_TF_LOGS=1`` (or ``cxrexp --tf-logs``) leaves everything as TensorFlow prints it.
Imports nothing of cxrexp.
"""

from __future__ import annotations

import contextlib
import os
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping

TF_LOGS_ENV = "CXREXP_TF_LOGS"


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """True when the user asked to see TensorFlow's own start-up logs."""
    environ = os.environ if environ is None else environ
    return environ.get(TF_LOGS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_tensorflow(show: bool = False) -> None:
    """Import TensorFlow and let it find its devices, its C++ start-up lines silenced.

    With ``show`` (or ``CXREXP_TF_LOGS``) they are printed as TensorFlow prints them. Nothing happens
    when TensorFlow is already loaded (its lines are out by then). Silenced, later C++ warnings are
    hidden too (``TF_CPP_MIN_LOG_LEVEL=2``, unless set); errors are not.
    """
    if "tensorflow" in sys.modules:
        return
    show = show or wanted()
    if not show:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with (contextlib.nullcontext() if show else _stderr_to_devnull()):
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery prints the CUDA lines


__all__ = ["TF_LOGS_ENV", "load_tensorflow", "wanted"]
