"""The door: a new connection's wait in the kernel counts against the latency budget, and a request
already too late is refused before uvicorn parses it.

With a fresh connection per request and arrivals past capacity, the queue builds in the listening
socket's accept queue, where neither the event loop nor admission control (service.batching) sees
it: requests were admitted with a 100 ms budget after waiting 0.9 s to be accepted, and every
refusal still paid for HTTP parsing, the ASGI task and the middleware, so refusing cost almost as
much as serving (docs/performance.md, "Overload").

The kernel knows how long a connection waited: TCP_INFO's ``tcpi_last_data_recv`` is the time since
the connection's last data arrived. On the first read of a connection that is how long its request
has waited, accept queue included (never more: a request split over several segments counts from
its last one). ``install()`` puts ``Door`` in front of uvicorn's httptools protocol (uvicorn's
``Config.load`` patched, as service.onewrite patches its writes) so that on a connection's first read:

- an inference request (``guard.is_inference``) that every served model would refuse with that wait
  (``guard.shed_early``, the guard's own rule, the wait weighted by KERNEL_WAIT_WEIGHT) is answered
  a fixed ``503`` with ``Retry-After`` and ``Connection: close`` at once, from the request line
  alone: no uvicorn protocol, parser, ASGI task or middleware (a refusal costs a tenth of an answer
  on the small model). Where the request is not all in, the rest is read and dropped until the client
  closes (closing on unread data would reset the connection and lose the answer). Health, metrics
  and every other route always go through;
- otherwise uvicorn's protocol takes the connection over, and the request's arrival is backdated by
  the wait (``ARRIVED_KEY`` in its ASGI scope, which the guard uses), so admission control counts
  the time spent before accept.

The door refuses before the guard checks the API key: a refusal does no work, and its fixed answer
says nothing about the key. Later requests on a kept-alive connection are judged by the guard as
before: their wait is in the event loop, not in the kernel.
"""
from __future__ import annotations

import asyncio
import functools
import json
import socket
import struct
import time
from typing import Any, Callable, Iterable, Optional

from service import metrics
from service.batching import Overloaded
from service.guard import ARRIVED_KEY, is_inference, shed_early

# struct tcp_info (linux/tcp.h): 8 one-byte fields, 9 u32 (rto ... fackets), then last_data_sent,
# last_ack_sent, last_data_recv (milliseconds).
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 8 + 9 * 4 + 2 * 4
_TCP_INFO_BYTES = _LAST_DATA_RECV_OFFSET + 4
# A wait in the accept queue counts double. That queue only grows while the service is already
# behind, so a request that spent part of its budget there spends about as long again once accepted
# (parsing behind the other connections, the model's queue). Counted once, the queue settled where
# waits were just under the budget, and the answers came after it.
KERNEL_WAIT_WEIGHT = 2.0
REFUSAL_MESSAGE = ("overloaded: this request waited to be accepted, and every model's latency budget "
                   "(IMGSERVE_MAX_LATENCY_MS) would be spent before it is answered; retry later")
DRAIN_LIMIT_S = 10.0  # a refused client that never closes is cut off after this long

_served: Optional[Callable[[], Iterable[Any]]] = None  # the served models, given to install()
ACTIVE = "off (uvicorn's httptools protocol was not patched)"


def install(served: Callable[[], Iterable[Any]]) -> str:
    """Put the door in front of uvicorn's httptools protocol (once); says what is active (the service
    logs it). ``served()`` gives the served models (each with a ``batcher``), as the guard takes them."""
    global ACTIVE, _served
    if not hasattr(socket, "TCP_INFO"):
        ACTIVE = "off (no TCP_INFO on this platform)"
        return ACTIVE
    try:
        import uvicorn.config
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as e:
        ACTIVE = f"off (uvicorn's httptools protocol is not available: {e})"
        return ACTIVE
    _served = served
    if not hasattr(uvicorn.config.Config.load, "__wrapped__"):
        uvicorn.config.Config.load = _door_in_front(uvicorn.config.Config.load, HttpToolsProtocol)
        HttpToolsProtocol.on_message_begin = _backdated(HttpToolsProtocol.on_message_begin)
    ACTIVE = "on (a new connection's wait in the accept queue counts; late inference refused before parsing)"
    return ACTIVE


def _door_in_front(load: Callable[[Any], None], http_protocol: type) -> Callable[[Any], None]:
    """uvicorn's ``Config.load`` -> the same, with connections served by the door first."""
    def load_with_door(config: Any) -> None:
        load(config)
        if config.http_protocol_class is http_protocol:
            config.http_protocol_class = functools.partial(Door, http_protocol)

    load_with_door.__wrapped__ = load  # type: ignore[attr-defined]
    return load_with_door


def waited_in_kernel(sock: Any) -> float:
    """Seconds since the connection's last data reached the kernel (0 when the kernel does not say)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError):  # not TCP (a unix socket), or closed meanwhile
        return 0.0
    if len(info) < _TCP_INFO_BYTES:
        return 0.0
    return _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0] / 1000.0


def request_path(first_bytes: bytes) -> Optional[str]:
    """The path of the request line at the start of a connection, None when it is not all there."""
    line_end = first_bytes.find(b"\r\n", 0, 8192)
    parts = first_bytes[:line_end].split(b" ") if line_end > 0 else []
    return parts[1].decode("latin-1") if len(parts) == 3 else None


def refusal(first_bytes: bytes, waited: float) -> Optional[Overloaded]:
    """The 503 for a new connection's first request, None when it goes in (not inference, or in time)."""
    path = request_path(first_bytes)
    if _served is None or path is None or not is_inference(path):
        return None
    return shed_early(_served, waited * KERNEL_WAIT_WEIGHT)


class Door(asyncio.Protocol):
    """A new connection until its first bytes: then either uvicorn's protocol takes over, or a 503.

    uvicorn's protocol is only built for a connection that goes in: building it (a parser, the
    connection's addresses, TLS checks) was a fifth of the cost of a refusal."""

    def __init__(self, http_protocol: type, **uvicorn_args: Any) -> None:
        self.http_protocol = http_protocol
        self.uvicorn_args = uvicorn_args
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        waited = waited_in_kernel(transport.get_extra_info("socket"))
        refused = refusal(data, waited)
        if refused is not None:
            metrics.ERRORS.labels(kind="overloaded").inc()
            return _refuse_connection(transport, data, refused)
        protocol = self.http_protocol(**self.uvicorn_args)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol._imgserve_arrived = time.perf_counter() - waited
        protocol.data_received(data)

    def eof_received(self) -> bool:
        return False  # closed before a request: nothing to answer

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None


def _backdated(on_message_begin: Callable[[Any], None]) -> Callable[[Any], None]:
    def door_on_message_begin(protocol: Any) -> None:
        on_message_begin(protocol)
        arrived = protocol.__dict__.pop("_imgserve_arrived", None)  # the connection's first request only
        if arrived is not None:
            protocol.scope[ARRIVED_KEY] = arrived

    door_on_message_begin.__wrapped__ = on_message_begin  # type: ignore[attr-defined]
    return door_on_message_begin


@functools.lru_cache(maxsize=64)
def refusal_bytes(retry_after: int) -> bytes:
    """The whole 503 answer (service.answer's JSON error shape), closing the connection."""
    body = json.dumps({"error": REFUSAL_MESSAGE}, separators=(",", ":")).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: {retry_after}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


def whole_request(data: bytes) -> bool:
    """Whether ``data`` holds a whole request: its head and the Content-Length bytes after it."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head = data[:head_end].lower()
    if b"transfer-encoding:" in head:
        return False  # chunked: its end is not cheap to find here
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return True
    line_end = head.find(b"\r\n", at + 2)
    value = head[at + 17:line_end if line_end > 0 else len(head)].strip()
    return value.isdigit() and len(data) - head_end - 4 >= int(value)


def _refuse_connection(transport: Any, data: bytes, refusal: Overloaded) -> None:
    transport.write(refusal_bytes(refusal.retry_after))
    if whole_request(data):
        transport.close()  # nothing unread: the answer goes out, then FIN
    else:
        _Draining(transport)


class _Draining(asyncio.Protocol):
    """A refused connection whose request is still arriving: stop writing, drop the rest, close when
    the client does (closing on unread data would reset the connection and lose the 503), or after
    DRAIN_LIMIT_S."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        transport.set_protocol(self)
        if transport.can_write_eof():
            transport.write_eof()
        self._limit = asyncio.get_running_loop().call_later(DRAIN_LIMIT_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the rest of the refused request

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._limit.cancel()
