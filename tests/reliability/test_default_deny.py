"""Default-deny access: with IMGSERVE_API_KEY set, every route the ASGI app really serves needs the key,
except the GET/HEAD routes of ``service.access`` (health probes, pages, /docs.json, /models, /metrics).

The routes are read from the real app (``python -m service.routemap`` builds it in a fresh process
and walks BentoML's routes, the mounted OIP and repository routes, static mounts, the lean route
and the pages), then every route x method is knocked on at a real `bentoml serve`. A route someone
adds later is in that walk, so it is checked without touching this test.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from rel_server import AUTH
from service.access import is_public
from service.launcher import REPO

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


@pytest.fixture(scope="module")
def routes(rel_bundle, tmp_path_factory) -> list[dict]:
    env = {**os.environ, "IMGSERVE_MODELS": str(rel_bundle), "BENTOML_HOME": str(tmp_path_factory.mktemp("routemap"))}
    out = subprocess.run([sys.executable, "-m", "service.routemap"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    found = [json.loads(line) for line in out.splitlines()]
    templates = {r["template"] for r in found}
    # the walk sees every kind of route: BentoML's, OIP, the repository, static files, the pages
    assert {"/classify", "/livez", "/v2/models/{name}/infer", "/v2/repository/models/{name}/load",
            "/static_content/{path:path}", "/demo", "/models"} <= templates, templates
    return found


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "nosuch", template)


def _knocks(routes: list[dict]) -> list[tuple[str, str]]:
    """Every (method, path): each route's own methods, and every other method too (a wrong method
    on a closed route must not tell an anonymous caller more than 401)."""
    return [(m, _concrete(r["template"])) for r in routes for m in METHODS]


def test_every_route_not_public_needs_the_key(wide_server, routes) -> None:
    open_, closed, wrong = [], [], []
    with httpx.Client(base_url=wide_server.url, timeout=30) as c:
        for method, path in _knocks(routes) + [("GET", "/no/such/route"), ("POST", "/no/such/route")]:
            r = c.request(method, path)
            if is_public(method, path):
                open_.append(path)
                if r.status_code == 401:
                    wrong.append(f"{method} {path}: public but 401")
            else:
                closed.append(path)
                if r.status_code != 401:
                    wrong.append(f"{method} {path}: {r.status_code} without the key")
                elif method != "HEAD" and "Authorization: Bearer" not in r.json()["error"]:
                    wrong.append(f"{method} {path}: 401 without the usual message")
    assert not wrong, "\n".join(wrong)
    print(f"{len(closed)} method x path need the key, {len(open_)} are public")
    assert {"/livez", "/readyz", "/v2/health/ready", "/metrics", "/docs.json", "/models", "/demo"} <= set(open_)
    assert {"/classify", "/v2", "/v2/models/nosuch", "/v2/repository/index", "/v2/repository/traffic",
            "/schema.json"} <= set(closed)


def test_the_key_opens_every_route(wide_server, routes) -> None:
    """With the key, no route answers 401 (the names are unknown ones: nothing gets loaded or unloaded)."""
    with httpx.Client(base_url=wide_server.url, timeout=30, headers=AUTH) as c:
        refused = [f"{m} {p}" for m, p in _knocks(routes) if c.request(m, p).status_code == 401]
    assert not refused, refused
