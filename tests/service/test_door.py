"""The door (service/door.py): a new connection's wait in the kernel's accept queue counts against the
latency budget, and an inference request already too late is answered 503 before uvicorn parses it.

The wait is made real: the service's workers are stopped (SIGSTOP) while clients connect and send,
so their requests sit in the accept queue exactly as they do when arrivals outrun the service. Without
the door the guard marked a request's arrival only once the worker got to it, and these answered 200
long after the budget."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from contextlib import contextmanager

import httpx
import pytest

from loadtests.soak import worker_pids
from service import door
from svc_factory import digit_pngs

BUDGET_S = 1.0  # the session server's IMGSERVE_MAX_LATENCY_MS default


def multipart(png: bytes) -> tuple[bytes, bytes]:
    """(head, body) of a POST /classify upload of ``png``."""
    body = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\nContent-Type: image/png\r\n\r\n'
            + png + b"\r\n--b--\r\n")
    head = (b"POST /classify HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head, body


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of the body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest


@contextmanager
def workers_stopped(server, seconds: float):
    """The service's processes stopped for ``seconds`` (the block runs first: its connections queue)."""
    pids = worker_pids(server.pid)
    assert pids, "no worker process"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        yield
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def connect(url: str) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def overloaded_count(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('imgserve_errors_total{kind="overloaded"}'))


def test_a_request_that_waited_past_the_budget_is_refused_and_health_still_answers(server) -> None:
    png = digit_pngs(1)[0]
    head, body = multipart(png)
    before = overloaded_count(server.url)
    with workers_stopped(server, seconds=0.8 * BUDGET_S):  # counted double: over the budget
        late = connect(server.url)
        late.sendall(head + body)
        probe = connect(server.url)
        probe.sendall(b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, answer = read_answer(late)
    assert status == 503, answer
    assert int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert "IMGSERVE_MAX_LATENCY_MS" in json.loads(answer)["error"]
    assert late.recv(1) == b"", "a refused connection is closed after its answer"
    assert read_answer(probe)[0] == 200, "health probes are never refused at the door"
    late.close()
    probe.close()
    assert overloaded_count(server.url) == before + 1
    # the refusal leaves nothing behind: the next request is served
    r = httpx.post(server.url + "/classify", files={"image": ("d.png", png, "image/png")}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_short_wait_is_served(server) -> None:
    head, body = multipart(digit_pngs(1)[0])
    with workers_stopped(server, seconds=0.1 * BUDGET_S):
        sock = connect(server.url)
        sock.sendall(head + body)
    status, _, answer = read_answer(sock)
    sock.close()
    assert status == 200, answer
    assert json.loads(answer)["predictions"]


def test_a_refused_upload_still_arriving_gets_its_answer_without_a_reset(server) -> None:
    """The door refuses on the first bytes; the rest of the body is read and dropped, so the client
    can finish sending and read the 503 (closing on unread data would reset the connection)."""
    head, body = multipart(digit_pngs(1)[0] + bytes(200_000))  # the tail comes after the refusal
    with workers_stopped(server, seconds=0.8 * BUDGET_S):
        sock = connect(server.url)
        sock.sendall(head + body[:100])
    time.sleep(0.3)  # the door has answered by now
    sock.sendall(body[100:])
    status, headers, answer = read_answer(sock)
    assert status == 503 and headers["connection"] == "close", answer
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""
    sock.close()


# -- the pieces, without a server ---------------------------------------------------------------------
def test_waited_in_kernel_is_the_time_since_the_request_arrived() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(listener.getsockname())
        client.sendall(b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(0.3)  # in the accept queue, as under overload
        conn, _ = listener.accept()
        waited = door.waited_in_kernel(conn)
        assert 0.25 <= waited < 2.0, waited
        client.sendall(b"more")
        conn.recv(100)
        assert door.waited_in_kernel(conn) < 0.1, "counted from the last data that arrived"
        conn.close()
        client.close()
    finally:
        listener.close()


@pytest.mark.parametrize("data, path", [
    (b"POST /classify HTTP/1.1\r\nHost: x\r\n\r\n", "/classify"),
    (b"POST /v2/models/m/infer HTTP/1.1\r\n", "/v2/models/m/infer"),
    (b"POST /classify HTTP/1.1", None),  # the request line is not all there yet
    (b"garbage\r\n", None),
])
def test_request_path(data: bytes, path: str | None) -> None:
    assert door.request_path(data) == path


@pytest.mark.parametrize("data, whole", [
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", True),
    (b"POST / HTTP/1.1\r\ncontent-length:  4 \r\n\r\nabc", False),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
    (b"POST / HTTP/1.1\r\nHost: x\r\n", False),
])
def test_whole_request(data: bytes, whole: bool) -> None:
    assert door.whole_request(data) is whole


def test_refusal_is_a_complete_http_answer() -> None:
    raw = door.refusal_bytes(3)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nretry-after: 3\r\n" in head
    assert f"content-length: {len(body)}".encode() in head
    assert json.loads(body)["error"] == door.REFUSAL_MESSAGE
