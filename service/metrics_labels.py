"""BentoML's HTTP metrics, labelled by route template instead of the raw path.

BentoML 1.4's ``RunnerTrafficMetricsMiddleware`` (bentoml/_internal/server/http/instruments.py, the
one ``_bentoml_impl/server/app.py`` installs) labels every series with ``endpoint=scope["path"]``:
each distinct path a client invents, routed or not, adds a set of series to /metrics and to the
worker's memory, for good. Here the same middleware sees the route's template instead
(``/v2/models/{name}/infer``; model names are in our own ``imgserve_*`` metrics), and every path the
app does not serve shares the one label ``UNKNOWN``. The real path is back in the scope before any
other middleware or route runs.

``install()`` swaps the class in BentoML's module before the app is built: app.py imports it from
there each time it builds its middleware list.
"""
from __future__ import annotations

import re
from typing import Any

from bentoml._internal.server.http import instruments
from starlette.routing import compile_path

from service.answer import RequestId
from service.routemap import served_routes

UNKNOWN = "unmatched"  # the endpoint label of every path no route serves
_RAW_PATH = "imgserve.raw_path"


class RouteLabels:
    """Path -> route template, for the routes of one app (exact paths first, then the templates)."""

    def __init__(self, app: Any) -> None:
        templates = {r.template for r in served_routes(app)}
        self.exact = {t for t in templates if "{" not in t}
        self.patterns: list[tuple[re.Pattern, str]] = [(compile_path(t)[0], t) for t in templates if "{" in t]

    def __call__(self, path: str) -> str:
        if path in self.exact:
            return path
        for rx, template in self.patterns:
            if rx.match(path):
                return template
        return UNKNOWN


class RouteLabelledTrafficMetrics(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's traffic metrics, with ``endpoint`` = the route template of the request."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        # This is the outermost middleware BentoML installs; the request id goes on right inside it,
        # so BentoML's own answers from the layers between here and our middlewares (its timeout's
        # 504, its concurrency limit's 503) carry one too.
        super().__init__(_RestorePath(RequestId(app)), **kwargs)
        self._labels: RouteLabels | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            if self._labels is None:  # scope["app"]: the Starlette app, complete once it serves
                self._labels = RouteLabels(scope["app"])
            scope[_RAW_PATH] = scope["path"]
            scope["path"] = self._labels(scope["path"])
        await super().__call__(scope, receive, send)


class _RestorePath:
    """The first thing inside the metrics middleware: the request's real path, back in the scope."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if _RAW_PATH in scope:
            scope["path"] = scope.pop(_RAW_PATH)
        await self.app(scope, receive, send)


def install() -> None:
    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledTrafficMetrics
