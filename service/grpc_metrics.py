"""Metrics of the gRPC server (service/grpc_oip.py), with bounded labels as REST's (service/metrics_labels.py).

``method`` is a served method's name or ``unmatched`` (any other path a client invents: each new
path would otherwise be a new series for good), ``code`` a gRPC status code name: at most
(served methods + 1) x 17 series, whatever clients send.
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import grpc

from service import metrics

UNMATCHED = "unmatched"
_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}  # the aio context reports an int or a StatusCode


def _code(context: Any, error: BaseException | None) -> str:
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _NAMES.get(code, "UNKNOWN")


@functools.lru_cache(maxsize=None)  # bounded: the labels are (see above)
def _child(metric: Any, **labels: str) -> Any:
    """``metric.labels(...)`` looked up once per label set, as ``metrics.for_model``: ``labels()``
    takes a lock and sorts its keywords on every call."""
    return metric.labels(**labels)


def record(method: str, context: Any, error: BaseException | None, t0: float) -> None:
    """Count one call of ``method`` by the status it ended with (``error``: what it raised, None when it
    returned) and time it from ``t0`` (``time.perf_counter()``). A plain call, not a context manager:
    it runs once per call on the event loop, and a generator-based ``with`` costs a frame more."""
    count(method, _code(context, error), t0)


def count(method: str, code: str, t0: float) -> None:
    """Count one call (or one message of a stream) of ``method`` that ended with status ``code`` (a
    ``grpc.StatusCode`` name), timed from ``t0``."""
    _child(metrics.GRPC_REQUESTS, method=method, code=code).inc()
    _child(metrics.GRPC_SECONDS, method=method).observe(time.perf_counter() - t0)


class Unimplemented(grpc.GenericRpcHandler):
    """Registered last: any method no other handler serves answers UNIMPLEMENTED, counted as ``unmatched``."""

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        async def refuse(request: bytes, context: Any) -> None:
            _child(metrics.GRPC_REQUESTS, method=UNMATCHED, code="UNIMPLEMENTED").inc()
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"method {handler_call_details.method} is not served")
        return grpc.unary_unary_rpc_method_handler(refuse)
