"""service.onewrite: uvicorn's own RequestResponseCycle, patched, puts head and body in one write."""
from __future__ import annotations

import asyncio
import logging

import pytest
import uvicorn.protocols.http.httptools_impl as uvicorn_httptools  # pinned (bentofile.yaml): never skipped

from service.onewrite import install, wrap_send


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def cycle(method: str = "POST", keep_alive: bool = True):
    from uvicorn.protocols.http.flow_control import FlowControl

    t = Transport()
    scope = {"type": "http", "method": method, "path": "/classify", "http_version": "1.1", "query_string": b""}
    log = logging.getLogger("test")
    c = uvicorn_httptools.RequestResponseCycle(scope, t, FlowControl(t), log, log, False, [], asyncio.Event(),
                                               False, keep_alive, lambda: None)
    return c, t


def run(c, *messages) -> None:
    send = wrap_send(uvicorn_httptools.RequestResponseCycle.send.__dict__.get("__wrapped__",
                                                                             uvicorn_httptools.RequestResponseCycle.send))

    async def go():
        for m in messages:
            await send(c, m)

    asyncio.run(go())


START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"7"),
                                                                  (b"content-type", b"application/json")]}
BODY = {"type": "http.response.body", "body": b'{"a":1}'}


@pytest.mark.parametrize("keep_alive", [True, False])
def test_head_and_body_leave_in_one_write(keep_alive: bool) -> None:
    c, t = cycle(keep_alive=keep_alive)
    run(c, START, BODY)
    assert len(t.writes) == 1, t.writes
    assert t.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and t.writes[0].endswith(b"\r\n\r\n" + BODY["body"])
    assert t.closed is (not keep_alive)


def test_streamed_body_sends_the_head_with_the_first_chunk() -> None:
    c, t = cycle()
    start = {"type": "http.response.start", "status": 200, "headers": []}  # no length: chunked
    run(c, start, {"type": "http.response.body", "body": b"ab", "more_body": True},
        {"type": "http.response.body", "body": b"cd"})
    assert len(t.writes) == 2 and t.writes[0].endswith(b"\r\n\r\n2\r\nab\r\n"), t.writes
    assert t.writes[1] == b"2\r\ncd\r\n0\r\n\r\n"


@pytest.mark.parametrize("keep_alive", [True, False])
def test_head_request_still_gets_its_head(keep_alive: bool) -> None:
    c, t = cycle("HEAD", keep_alive=keep_alive)
    run(c, START, {"type": "http.response.body", "body": b""})
    assert len(t.writes) == 1 and t.writes[0].startswith(b"HTTP/1.1 200 OK") and t.writes[0].endswith(b"\r\n\r\n")


def test_install_is_idempotent_and_active_in_the_service() -> None:
    import service.service  # noqa: F401  (installs it)

    assert install().startswith("one socket write")
    send = uvicorn_httptools.RequestResponseCycle.send
    assert hasattr(send, "__wrapped__") and not hasattr(send.__wrapped__, "__wrapped__"), "wrapped exactly once"

