"""Every route the service's ASGI app answers, as templates (``/v2/models/{name}/infer``) with their
methods: BentoML's own routes, the mounted Starlette routes (OIP, the repository, /models), mounted
static files, and the paths our middlewares answer themselves (the lean route, the pages).

Read from the real app object, not from a list kept by hand: the metrics use it to label requests
by route template (service/metrics_labels.py), and the access test to knock on every route.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Iterator

ANY_METHOD = frozenset({"ANY"})  # a mount or middleware path that takes every method


@dataclass(frozen=True)
class ServedRoute:
    template: str  # Starlette's path syntax: {name}, {path:path}
    methods: frozenset[str]


def served_routes(app: Any) -> list[ServedRoute]:
    """The routes of a Starlette app built by BentoML (``ImgServe.to_asgi()``, or ``scope["app"]``)."""
    found: dict[str, set[str]] = {}
    for template, methods in [*_router_routes(app.routes, ""), *_middleware_routes(app)]:
        found.setdefault(template, set()).update(methods)
    return [ServedRoute(t, frozenset(m)) for t, m in found.items()]


def _router_routes(routes: list, prefix: str) -> Iterator[tuple[str, frozenset[str]]]:
    for r in routes:
        path = prefix + getattr(r, "path", "")
        inner = getattr(r, "routes", None) if not hasattr(r, "endpoint") else None
        if inner:  # a Mount or PassiveMount of a Starlette app: its routes, under its path
            yield from _router_routes(inner, path)
        elif hasattr(r, "endpoint"):
            yield path, frozenset(r.methods or ANY_METHOD)
        else:  # a mounted ASGI app without routes (static files): everything under its path
            yield path.rstrip("/") + "/{path:path}", ANY_METHOD


def _middleware_routes(app: Any) -> Iterator[tuple[str, frozenset[str]]]:
    from service.pages import PAGES, PagesMiddleware
    from service.route import LeanRoute

    for m in app.user_middleware:
        if m.cls is LeanRoute:
            yield from ((path, frozenset({"POST"})) for path in m.kwargs["routes"])
        elif m.cls is PagesMiddleware:
            yield from ((path, frozenset({"GET", "HEAD"})) for path in PAGES)


def main() -> None:
    """``python -m service.routemap``: the served routes as JSON lines (builds the app; loads no model)."""
    from service.service import ImgServe

    for r in sorted(served_routes(ImgServe.to_asgi()), key=lambda r: r.template):
        sys.stdout.write(json.dumps({"template": r.template, "methods": sorted(r.methods)}) + "\n")


if __name__ == "__main__":
    main()
