"""A listening socket of its own for each worker (SO_REUSEPORT) when BentoML runs several.

BentoML's supervisor (circus) binds one socket and every worker accepts on it. Whichever event loop
wakes first then takes every connection waiting in the backlog, so a client that opens its keep-alive
connections at once can land 62 of 64 on one worker while the other idles, and two workers serve no
more than one (docs/performance.md, "Small model"). With one socket per worker, all bound with
SO_REUSEPORT, the kernel spreads new connections over the workers by a hash of their addresses.

Circus can do this (a socket marked so_reuseport is not bound by the supervisor but afresh in each
process it spawns), but it looks for the socket's name in the watcher's command, and BentoML passes it
in the arguments, so each worker would get the supervisor's unbound socket. Hence two halves, both run
at import of service.service:
- in the supervisor (``bentoml serve``), mark the API server's socket so_reuseport, so it is never
  bound there, and leave its address in the environment the workers inherit;
- in each worker, bind a fresh SO_REUSEPORT socket to that address and put it in place of the
  inherited one (same file descriptor number, which BentoML's worker then serves).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from typing import Any, Callable

API_SERVER_SOCKET = "_bento_api_server"  # _bentoml_impl.server.serving.API_SERVER_NAME
ADDRESS_ENV = "IMGSERVE_WORKER_SOCKET"  # set by the supervisor half, read by the worker half


def install(workers: int) -> str:
    """Run this process's half; says which ("supervisor", "worker", or "" when it does nothing)."""
    if workers <= 1 or not hasattr(socket, "SO_REUSEPORT"):
        return ""
    address = os.environ.get(ADDRESS_ENV)
    fd = _inherited_fd(sys.argv)
    if address and fd is not None:
        where = json.loads(address)
        try:
            _bind_in_place(fd, where)
        except OSError as e:  # e.g. the port is taken: restarting this worker would not help
            from service.lifecycle import _stop_supervisor

            _stop_supervisor(f"cannot listen on {where['host']}:{where['port']}: {e}")
            raise
        return "worker"
    from circus.sockets import CircusSocket

    if not getattr(CircusSocket.__init__, "per_worker", False):
        # wrapped, not subclassed: circus's own methods name the class (super(CircusSocket, self))
        CircusSocket.__init__ = _per_worker(CircusSocket.__init__)
    return "supervisor"


def _per_worker(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def per_worker_init(sock: Any, *args: Any, **kwargs: Any) -> None:
        mine = kwargs.get("name") == API_SERVER_SOCKET and kwargs.get("path") is None
        if mine:
            kwargs["so_reuseport"] = True  # circus then leaves it unbound
        init(sock, *args, **kwargs)
        if mine:
            os.environ[ADDRESS_ENV] = json.dumps({"host": sock.host, "port": sock.port,
                                                  "family": int(sock.family), "backlog": sock.backlog})

    per_worker_init.per_worker = True  # type: ignore[attr-defined]
    return per_worker_init


def _inherited_fd(argv: list[str]) -> int | None:
    """The listening socket's descriptor a BentoML worker was started with (``--fd N``)."""
    for i, arg in enumerate(argv):
        if arg == "--fd" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if arg.startswith("--fd=") and arg[5:].isdigit():
            return int(arg[5:])
    return None


def _bind_in_place(fd: int, address: dict[str, Any]) -> None:
    sock = socket.socket(address["family"], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address["host"], address["port"]))
        sock.listen(address["backlog"])
        os.dup2(sock.fileno(), fd)
    finally:
        sock.close()
