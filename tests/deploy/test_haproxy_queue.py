"""HAProxy's per-replica limit (deploy/replicas/haproxy.py ``server_maxconn``, ``queue_timeout_ms``)
with the real haproxy in front of a replica that takes 0.6 s per answer: one request in flight, the
next waits in HAProxy's queue and gets HAProxy's own 503 with Retry-After after the queue timeout,
and a replica's own 503 keeps its Retry-After."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from deploy.replicas.haproxy import HAProxy, Settings
from service.launcher import free_port

class SlowReplica(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # /readyz for HAProxy's checks
        self._answer(200, b"ok")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/busy":
            return self._answer(503, b'{"error":"overloaded"}', {"Retry-After": "7"})
        time.sleep(0.6)
        self._answer(200, b'{"ok":true}')

    def _answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"content-length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def balancer(tmp_path):
    replica = ThreadingHTTPServer(("127.0.0.1", 0), SlowReplica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    hap = HAProxy(tmp_path)
    port = free_port({replica.server_port})
    hap.start(Settings(bind=f"127.0.0.1:{port}", server_maxconn=1, queue_timeout_ms=200),
              [f"127.0.0.1:{replica.server_port}"])
    hap.wait_status(0, "UP", 10)
    yield f"http://127.0.0.1:{port}"
    hap.stop()
    replica.shutdown()


def test_over_the_limit_waits_then_gets_haproxys_503_with_retry_after(balancer) -> None:
    def post(_: int) -> tuple[httpx.Response, float]:
        t0 = time.perf_counter()
        r = httpx.post(balancer + "/classify", content=b"x", timeout=10)
        return r, time.perf_counter() - t0

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(post, range(3)))
    codes = sorted(r.status_code for r, _ in answers)
    assert codes == [200, 503, 503], codes
    for r, took in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1", r.headers
            assert 0.15 <= took < 0.6, f"refused after {took:.2f} s: not after the 0.2 s queue timeout"


def test_a_replicas_own_503_keeps_its_retry_after(balancer) -> None:
    r = httpx.post(balancer + "/busy", content=b"x", timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "7", r.headers
