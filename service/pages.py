"""The service's own web pages (service/static/): a landing page at ``/``, the demo at ``/demo`` and
Swagger UI at ``/docs``.

They are answered by an ASGI middleware, in front of BentoML's routes, because BentoML's own page at
``/`` (Swagger UI) loads Google Tag Manager from the internet, and a mounted app cannot take ``/``
from it. ``/docs`` is the same Swagger UI, from BentoML's local ``/static_content`` files, without it. Every page is static, loads nothing from outside this server (the Content-Security-Policy
says so to the browser too) and calls the public API only. The middleware also edits the OpenAPI
document at ``/docs.json``: it lists ``GET /models`` (a plain Starlette route, which BentoML leaves
out) and replaces BentoML's description, whose badges Swagger UI would load from the internet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlette.responses import Response

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Same origin only, also for the browser; blob: for the preview of the chosen image. Swagger UI
# (React) sets inline styles and draws data: icons.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SWAGGER_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGE_FILES = {"/": ("index.html", CSP), "/demo": ("demo.html", CSP), "/docs": ("docs.html", SWAGGER_CSP)}


def _pages() -> dict[str, tuple[bytes, str, dict[str, str]]]:
    """URL path -> (body, media type, headers): the pages, and every asset as /assets/NAME."""
    files = dict(PAGE_FILES)
    files |= {f"/assets/{p.name}": (p.name, CSP) for p in STATIC.iterdir() if p.suffix in (".css", ".js", ".svg")}
    return {url: ((STATIC / name).read_bytes(), MEDIA_TYPES[Path(name).suffix],
                  {"Content-Security-Policy": csp, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
            for url, (name, csp) in files.items()}


PAGES = _pages()  # read once: a request never touches the disk

DESCRIPTION = ("Image classification for the bundles this server was started with. Send an image as multipart field "
               "`image` to `POST /classify` (several as `images` to `POST /classify_batch`); `GET /models` lists "
               "the models. Try it in the browser at [/demo](/demo).")
MODELS_OPENAPI = {"get": {
    "summary": "The served models: name, version, classes, input, preprocessing, backend",
    "description": "`default` names the model used when a request gives none; `api_key_required` says whether "
                   "/classify needs `Authorization: Bearer KEY`; `models` has one entry per (name, version), with "
                   "`reference_stats` (present or why not) and `drift` (its live window's histograms and drift "
                   "scores against the reference, docs/monitoring.md); "
                   "`traffic` maps each name to its traffic policy and shadow figures, `traffic_policy` says where "
                   "the policy in force came from (docs/rollouts.md).",
    "operationId": "models",
    "tags": ["Service APIs"],
    "responses": {"200": {"description": "the served models", "content": {"application/json": {"schema": {
        "type": "object", "required": ["default", "models"],
        "properties": {"default": {"type": "string"}, "api_key_required": {"type": "boolean"},
                       "models": {"type": "array", "items": {"type": "object"}},
                       "traffic": {"type": "object", "additionalProperties": {"type": "object"}},
                       "traffic_policy": {"type": "object"}}}}}}},
}}


class PagesMiddleware:
    """GET/HEAD of a page or asset -> the file; GET /docs.json -> BentoML's document, edited."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        page = PAGES.get(scope["path"])
        if page is not None:
            body, media_type, headers = page
            return await Response(body, media_type=media_type, headers=headers)(scope, receive, send)
        if scope["path"] == "/docs.json":
            return await self.app(scope, receive, _edit_openapi(send))
        return await self.app(scope, receive, send)


def _edit_openapi(send: Any) -> Any:
    """A `send` that holds BentoML's OpenAPI JSON, adds GET /models and our description, and sends it on."""
    start: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        if start.get("status") == 200:
            spec = json.loads(body)
            spec.setdefault("paths", {}).setdefault("/models", MODELS_OPENAPI)
            spec.setdefault("info", {})["description"] = DESCRIPTION
            body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return wrapped
