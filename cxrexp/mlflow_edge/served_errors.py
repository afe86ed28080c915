"""What a served model answers when it fails: a fault is a 5xx with a reference, never a 400 with a trace.

MLflow's scoring server answers an unexpected exception from ``predict`` (a bug, a ``MemoryError``)
with HTTP 400 ("check your input") and the Python stack trace in the body: the client is blamed for
the server's fault and shown its internals. :func:`guarded_predict` turns every exception that is not
already an ``MlflowException`` (cxrexp raises those for bad rows, 400, and for broken weights, 500)
into ``INTERNAL_ERROR`` (HTTP 500) whose message is only a reference id; the traceback goes to the
server's log under that id. A ``RequestTimedOut`` (the request outlived the server's timeout, see
``serving.served_deadline``) becomes ``DEADLINE_EXCEEDED`` (504): the server has answered 504 already,
this only stops the work. The server still prefixes the message with a truncated echo of the
request DataFrame (``Failed to predict data '...'``): that part is MLflow's, see docs/serving.md.
"""

from __future__ import annotations

import functools
import logging
import secrets
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR

from cxrexp.images.request_images import RequestTimedOut

log = logging.getLogger(__name__)


def guarded_predict(predict: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a ``PythonModel.predict``: a timed-out request becomes a 504, any other non-MLflow
    exception a 500 naming a log reference."""

    @functools.wraps(predict)
    def wrapper(self, context, model_input, params=None):
        try:
            return predict(self, context, model_input, params)
        except MlflowException:
            raise
        except RequestTimedOut as err:
            raise MlflowException(str(err), error_code=DEADLINE_EXCEEDED) from None
        except Exception as err:  # noqa: BLE001 - MemoryError included: every fault is the server's
            reference = secrets.token_hex(6)
            rows = len(model_input) if hasattr(model_input, "__len__") else "?"
            log.error("internal error %s in %s.predict on %s rows: %s: %s", reference, type(self).__name__, rows,
                      type(err).__name__, err, exc_info=True)
            raise MlflowException(
                f"internal error in the model server (reference {reference}: its log has the details); "
                "the request itself may be fine, retry it or report the reference",
                error_code=INTERNAL_ERROR,
            ) from None

    return wrapper


__all__ = ["guarded_predict"]
