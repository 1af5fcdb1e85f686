"""The one path from a request's outcome to its HTTP answer, for every route we write.

BentoML's form APIs (/classify, /classify_batch, through the lean route or BentoML's router), the
Open Inference Protocol routes and the model repository all run their work through ``answer``:
a ``Refused`` becomes its 4xx JSON (counted in ``imgserve_errors`` by kind), ``Overloaded`` a 503
with ``Retry-After``, anything else a logged 500 with a fixed message (no exception text, no
server path). Every answer of the service carries a request id: ``RequestId``, installed right inside
BentoML's outermost middleware (service/metrics_labels.py), adds it, also to BentoML's own answers
(its 404/405s, its timeout's 504) and the guard's refusals.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Awaitable, Callable

import bentoml
from starlette.responses import Response

from service import metrics
from service.batching import Overloaded
from service.errors import Refused
from service.io import error_response

logger = logging.getLogger(__name__)

REQUEST_ID = b"x-request-id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")  # a client's own id is echoed only when it is this tame
INTERNAL_ERROR = "An unexpected error has occurred, please check the server log."


def refused(e: Refused) -> Response:
    metrics.ERRORS.labels(kind=e.kind).inc()
    return error_response(str(e), e.status, **e.extra)


def overloaded(e: Overloaded) -> Response:  # counted where it is raised (service.batching)
    return error_response(str(e), 503, retry_after=e.retry_after)


# Exception type -> its answer; the first entry the exception is an instance of wins.
ANSWERS: dict[type[Exception], Callable[[Any], Response]] = {Refused: refused, Overloaded: overloaded}


def starting() -> Refused:
    return Refused("the service is starting; retry shortly", 503, "starting", {"retry_after": 1})


# Resolved once: each ``bentoml.get_current_service`` attribute lookup goes through BentoML's lazy
# module ``__getattr__`` and importlib.
_current_service = bentoml.get_current_service


def current_service() -> Any:
    """The running service instance; ``starting()`` (503, Retry-After) before it exists."""
    try:
        return _current_service()
    except Exception:  # not started yet, or shutting down
        raise starting() from None


async def answer(work: Callable[[], Awaitable[Response]], where: str = "request") -> Response:
    """``await work()``, or the answer to what it raised."""
    try:
        return await work()
    except Exception as e:
        for kind, respond in ANSWERS.items():
            if isinstance(e, kind):
                return respond(e)
        logger.exception("%s failed", where)
        metrics.ERRORS.labels(kind="internal").inc()
        return error_response(INTERNAL_ERROR, 500)


class RequestId:
    """ASGI: every HTTP answer carries ``X-Request-ID``: the client's own when it sent a tame one
    (so a caller can follow its request through proxies and our log), a fresh random one otherwise."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = next((v for k, v in scope["headers"] if k == REQUEST_ID), None)
        if rid is None or not _CLIENT_ID.fullmatch(rid):
            rid = os.urandom(8).hex().encode()
        scope["imgserve.request_id"] = rid

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)
