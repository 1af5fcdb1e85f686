"""ASGI guard in front of BentoML: the API key (401), the body-size limit (413) and early shedding (503).
It learns the served models from a callable, so it never imports service.service."""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Optional

from service import access, metrics, traffic
from service.answer import overloaded, refused
from service.batching import Overloaded, mark_arrival
from service.errors import Refused as _Refused
from service.io import TOO_LARGE_KEY

ARRIVED_KEY = "imgserve.arrived"  # ASGI scope: when the request reached the kernel (service.door sets it)
_BYTE_COUNT = re.compile(rb"[0-9]{1,18}")  # a Content-Length int() reads instantly


class GuardMiddleware:
    """ASGI: the API key (401; every route but ``service.access``'s public list) and the body-size
    limit (413) before BentoML sees the request, and early shedding (503) for inference.

    BentoML reserves 401 for itself and parses the whole body before the API runs, so both checks
    belong in front of it. The key is compared in constant time and never logged.
    """

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None,
                 models: Optional[Callable[[], Iterable[Any]]] = None) -> None:
        self.app = app
        self.models = models  # the served models (raises before they exist); None: no early shedding
        self.max_body = max_body_bytes
        self.key = api_key or None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and not self._authorized(dict(scope["headers"])):
            metrics.ERRORS.labels(kind="unauthorized").inc()
            return await send({"type": "websocket.close", "code": 1008})  # policy violation, before accept
        if scope["type"] != "http" or access.is_public(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        mark_arrival(scope.get(ARRIVED_KEY))  # service.door: when the request reached the kernel
        traffic.HEADERS.set(scope["headers"])  # a traffic policy's sticky header (service/versions.py)
        headers = dict(scope["headers"])
        if not self._authorized(headers):
            return await refused(_Refused("missing or wrong API key: send 'Authorization: Bearer <IMGSERVE_API_KEY>'",
                                          401, "unauthorized"))(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and (not _BYTE_COUNT.fullmatch(length) or int(length) > self.max_body):
            return await self._too_large(scope, receive, send)
        shed = shed_early(self.models) if self.models is not None and is_inference(scope["path"]) else None
        if shed is not None:
            # Every model is over its latency budget: refuse before BentoML parses the form, the
            # costliest part of a refusal. The body is drained first (it is within the size limit):
            # closing on an unread body resets the connection and the client would lose the 503.
            seen = 0
            while True:
                msg = await receive()
                seen += len(msg.get("body", b""))
                if not msg.get("more_body") or seen > self.max_body:
                    break
            metrics.ERRORS.labels(kind="overloaded").inc()
            return await overloaded(shed)(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:  # chunked upload that grew too big: end the stream here
                    scope[TOO_LARGE_KEY] = self.max_body
                    return {"type": "http.disconnect"}
            return msg

        await self.app(scope, limited_receive, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        return access.bearer_matches(headers.get(b"authorization", b""), self.key)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await refused(_Refused(f"request body is over the limit of {self.max_body} bytes (IMGSERVE_MAX_BODY_BYTES)",
                               413, "body_too_large"))(scope, receive, send)


def is_inference(path: str) -> bool:
    """/classify* and OIP inference: the routes that early shedding refuses when every model is full."""
    return path.startswith("/classify") or (path.startswith("/v2/models/") and path.endswith("/infer"))


def shed_early(served: Callable[[], Iterable[Any]], waited: float | None = None) -> Overloaded | None:
    """The refusal when every served model would refuse one more image now (that has waited ``waited``
    seconds already; default: since the current request's arrival), else None."""
    try:
        models = served()
    except Exception:  # not started yet (or shutting down): let the request through
        return None
    refusal = None
    for m in models:
        try:
            m.batcher.check(1, waited=waited)
        except Overloaded as e:
            refusal = refusal or e
        else:
            return None
    return refusal
