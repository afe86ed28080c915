"""Signals that would otherwise leave an MLflow run RUNNING for good.

A process ended by SIGTERM (``kill``, a process manager, Kubernetes stopping a pod) dies without
running any ``finally``: its run stays RUNNING in the tracking store. Inside
:func:`sigterm_as_interrupt` SIGTERM acts like Ctrl-C, so ``tracking.step_run`` ends the run KILLED.
Under ``mlflow run`` the step is a child of the ``mlflow`` process; when that parent is killed the
child would keep running orphaned, so :func:`die_with_parent` asks the kernel for a SIGTERM then.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys
import threading
from typing import Any, Iterator

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM raises KeyboardInterrupt("signal SIGTERM"), as Ctrl-C would.

    Only the main thread can install signal handlers; elsewhere this does nothing. Nested uses
    restore the handler they found.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent() -> bool:
    """Ask Linux to send this process SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    True when set; False elsewhere (macOS, Windows: there a killed ``mlflow run`` still leaves the run
    RUNNING, and ``mlflow runs`` shows it).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError) as err:
        log.debug("prctl(PR_SET_PDEATHSIG) unavailable: %s", err)
        return False


__all__ = ["die_with_parent", "sigterm_as_interrupt"]
