"""API key: with IMGSERVE_API_KEY set, the classify endpoints need `Authorization: Bearer KEY`
(401 otherwise); health, metrics and docs stay open; the key never reaches the server's output."""
from __future__ import annotations

import httpx
import pytest

from rel_corpus import digit, encode
from rel_server import API_KEY, AUTH

PNG = encode(digit(), "PNG")
WRONG = {
    "none": {},
    "wrong_key": {"Authorization": "Bearer not-the-key"},
    "key_plus_suffix": {"Authorization": f"Bearer {API_KEY}x"},
    "key_prefix_only": {"Authorization": f"Bearer {API_KEY[:-1]}"},
    "no_bearer_word": {"Authorization": API_KEY},
    "basic_scheme": {"Authorization": f"Basic {API_KEY}"},
    "empty": {"Authorization": ""},
    "key_in_other_header": {"X-Api-Key": API_KEY},
}


def _post(url: str, endpoint: str, headers: dict[str, str]) -> httpx.Response:
    field = "image" if endpoint == "/classify" else "images"
    return httpx.post(url + endpoint, files=[(field, ("d.png", PNG, "image/png"))], headers=headers, timeout=30)


@pytest.mark.parametrize("endpoint", ["/classify", "/classify_batch"])
@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_or_missing_key_is_401(api_server, endpoint: str, case: str) -> None:
    r = _post(api_server.url, endpoint, WRONG[case])
    assert r.status_code == 401, f"{case} on {endpoint}: {r.status_code} {r.text[:200]}"
    assert "Authorization: Bearer" in r.json()["error"], r.text


@pytest.mark.parametrize("endpoint", ["/classify", "/classify_batch"])
def test_right_key_is_200(api_server, endpoint: str) -> None:
    r = _post(api_server.url, endpoint, AUTH)
    assert r.status_code == 200, r.text


def test_401_comes_before_parsing(api_server) -> None:
    """An unauthenticated client cannot make the server parse its body: a bomb or a huge body is 401."""
    r = httpx.post(api_server.url + "/classify", content=b"\0" * 2_000_000,
                   headers={"content-type": "multipart/form-data; boundary=x"}, timeout=30)
    assert r.status_code == 401, r.text


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/models", "/docs.json"])
def test_health_metrics_docs_stay_open(api_server, path: str) -> None:
    assert httpx.get(api_server.url + path, timeout=10).status_code == 200, path


def test_key_never_in_output(api_server) -> None:
    """Exercise success and every refusal, then grep the server's stdout/stderr and /metrics."""
    for headers in [AUTH, *WRONG.values()]:
        _post(api_server.url, "/classify", headers)
    metrics = httpx.get(api_server.url + "/metrics", timeout=10).text
    log = api_server.log_path.read_text(errors="replace")
    assert API_KEY not in log, "the API key leaked into the server log"
    assert API_KEY[:12] not in log, "part of the API key leaked into the server log"
    assert API_KEY not in metrics, "the API key leaked into /metrics"
    assert 'kind="unauthorized"' in metrics, "401s are not counted in imgserve_errors"


def test_key_compared_in_constant_time(monkeypatch) -> None:
    """The guard compares the whole header with hmac.compare_digest (timing cannot be asserted here,
    so check the comparison it uses), and a mismatch never reaches the app."""
    import asyncio
    import hmac

    from service import service as svc_module

    calls, reached = [], []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))

    async def app(scope, receive, send):
        reached.append(scope["path"])

    guard = svc_module.GuardMiddleware(app, max_body_bytes=1000, api_key=API_KEY)
    sent = []

    async def run(auth: bytes) -> None:
        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [(b"authorization", auth)]}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg):
            sent.append(msg)

        await guard(scope, receive, send)

    asyncio.run(run(b"Bearer wrong"))
    asyncio.run(run(f"Bearer {API_KEY}".encode()))
    assert calls == [(b"Bearer wrong", f"Bearer {API_KEY}".encode()), (f"Bearer {API_KEY}".encode(),) * 2], calls
    assert reached == ["/classify"], "the wrong key reached the app, or the right one did not"
    assert sent[0]["status"] == 401


def test_websockets_need_the_key_too() -> None:
    """Default-deny covers a websocket route someone adds later: without the key the guard closes
    the handshake (1008, policy violation) before the app sees it; with it the app gets the scope."""
    import asyncio

    from service import service as svc_module

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    guard = svc_module.GuardMiddleware(app, max_body_bytes=1000, api_key=API_KEY)

    async def run(headers: list) -> None:
        async def receive():
            return {"type": "websocket.connect"}

        async def send(msg):
            sent.append(msg)

        await guard({"type": "websocket", "path": "/ws", "headers": headers}, receive, send)

    asyncio.run(run([]))
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == []
    asyncio.run(run([(b"authorization", f"Bearer {API_KEY}".encode())]))
    assert reached == ["/ws"]
