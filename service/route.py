"""The lean request path: POST /classify and /classify_batch served by a raw ASGI route.

Added to the service with ``add_asgi_middleware`` after the guard, so it runs inside BentoML's
request metrics, tracing filter, timeout and the guard (API key, body limit, early shedding), and
in front of BentoML's router. For the two form APIs it reads the body, splits the form with the
same parser (``service.io.form_fields``) and calls the very function under ``@bentoml.api``, which
validates, answers the error table and counts the metrics as before. What it skips is BentoML's
per-request machinery between the guard and that function: the request context, Starlette's
router and exception layers, and ``api_endpoint`` (serde lookup, ``Request`` objects, the bound
API method rebuilt with ``inspect.signature`` for every call, background tasks); docs/performance.md
has the profile and the figures. The ``@bentoml.api`` declarations stay: they make the OpenAPI
schema, Swagger UI and ``bentoml.SyncHTTPClient`` work unchanged; every other path and method
(GET /classify -> 405, /metrics, /models, health probes) goes on to BentoML.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import bentoml
from service.io import TOO_LARGE_KEY, form_fields, json_response

logger = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]


class FormRoute:
    """One form API: where its fields come from and which ``@bentoml.api`` function answers it."""

    def __init__(self, api: str, input_cls: type[bentoml.IODescriptor], file_field: str, max_files: int) -> None:
        self.api, self.input_cls, self.file_field, self.max_files = api, input_cls, file_field, max_files
        # Absent fields take the declared defaults, as ``model_construct`` fills them for BentoML.
        self.defaults = {k: f.default for k, f in input_cls.model_fields.items() if k != file_field}

    def handler(self, service: Any) -> Handler:
        """The undecorated API function bound to the service instance (``APIMethod.func``)."""
        method = getattr(type(service), self.api)
        func = getattr(method, "func", method)
        return func.__get__(service)

    def kwargs(self, scope: dict, body: bytes | None) -> dict[str, Any]:
        ctype = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), "")
        return {**self.defaults, **form_fields(ctype, body, scope, self.input_cls, self.file_field, self.max_files)}


class ClassifyRoute:
    """ASGI: serves the POST routes in ``routes`` itself, passes everything else to ``app``."""

    def __init__(self, app: Any, routes: dict[str, FormRoute], server_header: str) -> None:
        self.app = app
        self.routes = routes
        self.server = server_header.encode("latin-1")
        self._handlers: dict[str, Handler] = {}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        if body is None and not scope.get(TOO_LARGE_KEY):
            return  # the client went away: nobody to answer
        try:
            response = await self._handler(route)(**route.kwargs(scope, body))
        except Exception:  # as BentoML does for an API that raises: log it, answer a bare 500
            logger.exception("%s %s failed", scope["method"], scope["path"])
            response = json_response({"error": "An unexpected error has occurred, please check the server log."}, 500)
        response.raw_headers.append((b"server", self.server))
        await response(scope, receive, send)

    def _handler(self, route: FormRoute) -> Handler:
        h = self._handlers.get(route.api)
        if h is None:  # the service instance exists only once the worker has started
            h = self._handlers[route.api] = route.handler(bentoml.get_current_service())
        return h


async def _read_body(receive: Any) -> bytes | None:
    """The whole request body; None when the stream ended in a disconnect (or the guard's cut-off)."""
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks) if len(chunks) > 1 else chunks[0]
