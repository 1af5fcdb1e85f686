"""Each HTTP response leaves the process in one socket write: status line, headers and body together.

uvicorn writes the head when the app sends ``http.response.start`` and the body at
``http.response.body``: two writes, and under load the event loop, the GIL or the OS scheduler can
put milliseconds between them. A replica killed in that gap leaves its load balancer holding a
response head without a body, which it cannot replay (it already started answering), so the client
gets a truncated answer. With one write a killed replica has either sent the whole answer or
nothing, and "nothing" is what HAProxy retries on another replica (retry-on empty-response). One
write is also one syscall and one TCP segment fewer per answer.

``install()`` wraps uvicorn's httptools protocol (the one used when httptools is installed, as here);
it is called when service.service is imported, i.e. in every worker before it serves.
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class _Held:
    """Stands in for the transport while uvicorn writes the head: keeps the bytes instead."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Prefixed:
    """Stands in for the transport while uvicorn writes the body: the held head goes out with it."""

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data)

    def flush(self) -> None:
        if self.head:
            self.write(b"")

    def close(self) -> None:  # Connection: close answers close right after the body
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def wrap_send(send):
    """uvicorn's ``RequestResponseCycle.send`` -> the same, with the head held until the first body write."""

    async def one_write_send(self, message: dict) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            real, held = self.transport, _Held(self.transport)
            self.transport = held
            try:
                await send(self, message)
            finally:
                self.transport = real
            self._imgserve_head = b"".join(held.data)
            return
        head = getattr(self, "_imgserve_head", b"")
        if not head or message["type"] != "http.response.body":
            return await send(self, message)
        self._imgserve_head = b""
        real, prefixed = self.transport, _Prefixed(self.transport, head)
        self.transport = prefixed
        try:
            await send(self, message)
        finally:
            self.transport = real
            prefixed.flush()  # a HEAD answer writes no body: the head still goes out

    one_write_send.__wrapped__ = send
    return one_write_send


WRITE_PATH = "two writes per response (uvicorn's httptools protocol was not patched)"


def install() -> str:
    """Patch uvicorn's httptools protocol once; returns the write path now active (the service logs it).

    The pinned uvicorn and httptools (bentofile.yaml) always have it; without httptools uvicorn falls
    back to h11, whose responses keep two writes, and the log line says so."""
    global WRITE_PATH
    try:
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError as e:
        WRITE_PATH = f"two writes per response (uvicorn's httptools protocol is not available: {e})"
        return WRITE_PATH
    if not hasattr(RequestResponseCycle.send, "__wrapped__"):
        RequestResponseCycle.send = wrap_send(RequestResponseCycle.send)
    WRITE_PATH = "one socket write per response (uvicorn's httptools RequestResponseCycle.send patched)"
    return WRITE_PATH
