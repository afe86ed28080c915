"""What a served model answers when it fails: a fault is a 5xx with a reference, never a 400 with a trace.

MLflow's scoring server answers an unexpected exception from ``predict`` (a bug, a ``MemoryError``)
with HTTP 400 ("check your input") and the Python stack trace in the body: the client is blamed for
the server's fault and shown its internals. :func:`guarded_predict` turns every exception that is not
already an ``MlflowException`` (cxrexp raises those for bad rows, 400, and for broken weights, 500)
into ``INTERNAL_ERROR`` (HTTP 500) whose message is only a reference id; the traceback goes to the
server's log under that id. A ``RequestTimedOut`` (the request outlived the server's timeout, see
``serving.served_deadline``) becomes ``DEADLINE_EXCEEDED`` (504): the server has answered 504 already,
this only stops the work.

MLflow's server then rewrites the message of any ``MlflowException`` from ``predict`` as
``Failed to predict data '<str(request DataFrame)>'. \nError: <message>``, echoing the start of every
shown cell (the images' base64) into the body. Every exception leaving :func:`guarded_predict` is
therefore a :class:`ServedError`, whose message keeps the first value it was given. MLflow's schema
check, which runs before the model and would echo the request too, has nothing to refuse: the
signature's ``image`` is of any type and optional (``serving.request_schema``), and the model checks
each row itself.
"""

from __future__ import annotations

import functools
import logging
import secrets
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, ErrorCode

from cxrexp.images.request_images import RequestTimedOut

log = logging.getLogger(__name__)


class ServedError(MlflowException):
    """An ``MlflowException`` whose message the scoring server cannot prefix with the request.

    ``message`` is set once, by ``MlflowException.__init__``; later assignments (the server's
    ``e.message = f"Failed to predict data '{data}'. ..."``) are ignored, so the body says only what
    cxrexp said: which rows, which limit, which reference.
    """

    @property
    def message(self) -> str:
        return self.__dict__["_message"]

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)

    @classmethod
    def of(cls, err: MlflowException) -> ServedError:
        """``err`` with the same message and error code, as a ``ServedError``."""
        if isinstance(err, cls):
            return err
        return cls(err.message, error_code=ErrorCode.Value(err.error_code))


def guarded_predict(predict: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates a ``PythonModel.predict``: a timed-out request becomes a 504, any other non-MLflow
    exception a 500 naming a log reference."""

    @functools.wraps(predict)
    def wrapper(self, context, model_input, params=None):
        try:
            return predict(self, context, model_input, params)
        except MlflowException as err:  # cxrexp's own: bad rows and limits (400), broken weights (500)
            raise ServedError.of(err) from None
        except RequestTimedOut as err:
            raise ServedError(str(err), error_code=DEADLINE_EXCEEDED) from None
        except Exception as err:  # noqa: BLE001 - MemoryError included: every fault is the server's
            reference = secrets.token_hex(6)
            rows = len(model_input) if hasattr(model_input, "__len__") else "?"
            log.error("internal error %s in %s.predict on %s rows: %s: %s", reference, type(self).__name__, rows,
                      type(err).__name__, err, exc_info=True)
            raise ServedError(
                f"internal error in the model server (reference {reference}: its log has the details); "
                "the request itself may be fine, retry it or report the reference",
                error_code=INTERNAL_ERROR,
            ) from None

    return wrapper


__all__ = ["ServedError", "guarded_predict"]
