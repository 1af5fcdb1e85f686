"""The lean request path: POST /classify, /classify_batch and OIP infer served by a raw ASGI route.

Added to the service with ``add_asgi_middleware`` after the guard, so it runs inside BentoML's
request metrics, tracing filter, timeout and the guard (API key, body limit, early shedding), and
in front of BentoML's router. For the two form APIs it reads the body, splits the form with the
same parser (``service.io.form_fields``) and calls the very function under ``@bentoml.api``, which
validates, answers the error table and counts the metrics as before. What it skips is BentoML's
per-request machinery between the guard and that function: the request context, Starlette's
router and exception layers, and ``api_endpoint`` (serde lookup, ``Request`` objects, the bound
API method rebuilt with ``inspect.signature`` for every call, background tasks); docs/performance.md
has the profile and the figures. Open Inference Protocol ``POST /v2/models/{name}[/versions/{v}]/infer``
takes the same path to ``service.oip.answer_infer`` (its Starlette route stays for other methods).
The ``@bentoml.api`` declarations stay: they make the OpenAPI
schema, Swagger UI and ``bentoml.SyncHTTPClient`` work unchanged; every other path and method
(GET /classify -> 405, /metrics, /models, health probes) goes on to BentoML.
"""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import bentoml
from service import jsonbounds
from service.answer import answer
from service.io import TOO_LARGE_KEY, form_fields, header


Handler = Callable[..., Awaitable[Any]]  # an API function, or a route's answer: (scope, body, **path groups)
Budget = Callable[..., "int | None"]  # a route's most JSON values: (scope, **path groups)


class FormRoute:
    """One form API: where its fields come from and which ``@bentoml.api`` function answers it."""

    def __init__(self, api: str, input_cls: type[bentoml.IODescriptor], file_field: str, max_files: int) -> None:
        self.api, self.input_cls, self.file_field, self.max_files = api, input_cls, file_field, max_files
        # Absent fields take the declared defaults, as ``model_construct`` fills them for BentoML.
        self.defaults = {k: f.default for k, f in input_cls.model_fields.items() if k != file_field}
        self._handler: Handler | None = None

    async def __call__(self, scope: dict, body: bytes | None) -> Any:
        if self._handler is None:  # the service instance exists only once the worker has started
            self._handler = self.handler(bentoml.get_current_service())
        return await self._handler(**self.kwargs(scope, body))

    def handler(self, service: Any) -> Handler:
        """The undecorated API function bound to the service instance (``APIMethod.func``)."""
        method = getattr(type(service), self.api)
        func = getattr(method, "func", None)
        if func is None:  # falling back to the APIMethod itself would route the call back here
            raise RuntimeError(f"{self.api}: BentoML's APIMethod has no 'func' (the lean route needs the BentoML "
                               "pinned in bentofile.yaml)")
        return func.__get__(service)

    def kwargs(self, scope: dict, body: bytes | None) -> dict[str, Any]:
        ctype = header(scope, b"content-type") or ""
        return {**self.defaults, **form_fields(ctype, body, scope, self.input_cls, self.file_field, self.max_files)}


class LeanRoute:
    """ASGI: answers the POST routes it knows itself, passes everything else to ``app``.

    ``routes`` maps exact paths to answers; ``patterns`` maps path regexes to answers that take the
    regex's named groups as keyword arguments (``/v2/models/{name}/infer``). An answer is
    ``async (scope, body, **groups) -> Response``; ``body`` is None when the guard cut off a
    chunked body over the size limit (``scope[TOO_LARGE_KEY]`` says so), and the answer says 413.
    ``budgets`` (keyed like ``patterns``) give a route's most JSON values, ``(scope, **groups) ->
    int | None``: commas are counted as the body arrives, and once over, the rest is read and
    dropped (never held) and the answer is 413.
    """

    def __init__(self, app: Any, routes: dict[str, Handler], server_header: str,
                 patterns: dict[str, Handler] | None = None, budgets: dict[str, Budget] | None = None) -> None:
        self.app = app
        self.routes = routes
        self.patterns = [(re.compile(rx), answer, (budgets or {}).get(rx)) for rx, answer in (patterns or {}).items()]
        self.server = server_header.encode("latin-1")

    def _match(self, path: str) -> tuple[Handler, dict[str, str], Budget | None] | None:
        answer = self.routes.get(path)
        if answer is not None:
            return answer, {}, None
        for rx, answer, budget in self.patterns:
            m = rx.fullmatch(path)
            if m is not None:
                return answer, m.groupdict(), budget
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        found = self._match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if found is None:
            return await self.app(scope, receive, send)
        respond, groups, budget = found

        async def work() -> Any:
            body = await _read_body(receive, budget(scope, **groups) if budget else None)
            if body is None and not scope.get(TOO_LARGE_KEY):
                return None  # the client went away: nobody to answer
            return await respond(scope, body, **groups)

        response = await answer(work, f"POST {scope['path']}")
        if response is not None:
            response.raw_headers.append((b"server", self.server))
            await response(scope, receive, send)


async def _read_body(receive: Any, most_values: int | None = None) -> bytes | None:
    """The whole request body; None when the stream ended in a disconnect (or the guard's cut-off).
    Over ``most_values`` JSON values (commas + 1): the rest is drained unkept, then a 413."""
    chunks, commas = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunk = msg.get("body", b"")
        if most_values is not None:
            commas += chunk.count(b",")
            if commas >= most_values:
                return await _drain_then_refuse(receive, most_values, commas + 1, msg.get("more_body", False))
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks) if len(chunks) > 1 else chunks[0]


async def _drain_then_refuse(receive: Any, most_values: int, seen: int, more: bool) -> None:
    """Read the rest of a body that is already refused, keeping none of it: closing the connection
    on an unread body instead would reset it, and a client sending all before reading loses the 413."""
    while more:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        seen += msg.get("body", b"").count(b",")
        more = msg.get("more_body", False)
    raise jsonbounds.too_many_values("the inference request", most_values, seen)
