"""The pages the service serves itself (service/pages.py): /, /demo and /docs load nothing from
outside the server, BentoML's tracker-loading index is gone, and GET /models is in /docs.json."""
from __future__ import annotations

import re

import httpx
import pytest

PAGES = ("/", "/demo", "/docs")
# Where an HTML page or a style sheet names something the browser fetches or runs.
LOADS = [re.compile(r'\b(?:src|href|action|poster|srcset)\s*=\s*["\']([^"\']*)["\']', re.I),
         re.compile(r'url\(\s*["\']?([^"\')]+)', re.I), re.compile(r'@import\s+["\']([^"\']+)', re.I)]


def loaded_urls(text: str) -> list[str]:
    return [m for rx in LOADS for m in rx.findall(text)]


def is_local(ref: str) -> bool:
    """Same origin: a path on this server (not //host/...), a fragment, or inline data."""
    return (ref.startswith("/") and not ref.startswith("//")) or ref.startswith(("#", "data:", "./"))


def fetch(server, path: str) -> httpx.Response:
    r = httpx.get(server.url + path, timeout=10)
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    return r


@pytest.mark.parametrize("path", PAGES)
def test_pages_load_nothing_from_outside(server, path: str) -> None:
    page = fetch(server, path)
    assert page.headers["content-type"].startswith("text/html")
    assert "googletagmanager" not in page.text.lower()
    refs = loaded_urls(page.text)
    assert refs and all(is_local(r) for r in refs), refs
    csp = page.headers["content-security-policy"]
    # the browser enforces it as well: no directive names another origin or a scheme-wide source
    assert "default-src 'none'" in csp and not re.search(r"https?:|\*", csp), csp
    for ref in refs:
        if ref.startswith(("/assets/", "/static_content/")) and ref.endswith((".css", ".js")):
            sub = fetch(server, ref)
            outside = [u for u in loaded_urls(sub.text) if not is_local(u)] if ref.endswith(".css") else []
            assert outside == [], (ref, outside)


@pytest.mark.parametrize("asset", ["/assets/demo.js", "/assets/index.js", "/assets/docs.js", "/assets/site.css"])
def test_our_scripts_name_no_other_origin(server, asset: str) -> None:
    text = fetch(server, asset).text
    assert not re.search(r"https?://", text), re.findall(r"https?://\S+", text)


def test_landing_links_the_demo_and_demo_calls_the_public_api(server) -> None:
    assert 'href="/demo"' in fetch(server, "/").text
    js = fetch(server, "/assets/demo.js").text
    assert set(re.findall(r'"(/[a-z_]+)"', js)) == {"/models", "/classify", "/explain"}


def test_models_in_openapi(server) -> None:
    spec = fetch(server, "/docs.json").json()
    # Swagger UI renders the description as Markdown: an image in it would be fetched from its host
    assert not re.search(r"https?://", spec["info"]["description"]), spec["info"]["description"]
    assert {"/classify", "/classify_batch", "/models"} <= set(spec["paths"]), sorted(spec["paths"])
    assert "get" in spec["paths"]["/models"] and "200" in spec["paths"]["/models"]["get"]["responses"]
    listed = fetch(server, "/models").json()
    schema = spec["paths"]["/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(schema["required"]) <= set(listed) and set(listed) <= set(schema["properties"]), listed.keys()


def test_unknown_asset_and_post_are_not_pages(server) -> None:
    assert httpx.get(server.url + "/assets/../service.py", timeout=10).status_code == 404
    assert httpx.get(server.url + "/assets/nope.js", timeout=10).status_code == 404
    assert httpx.post(server.url + "/demo", timeout=10).status_code in (404, 405)
