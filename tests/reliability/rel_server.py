"""Helpers for the reliability tests: the repository's launcher (``service.launcher.start_service``),
the shared server's settings (a random API key, small limits), raw requests, the worker's PID.

Requests go through ``loadtests.soak.fire`` (raw asyncio sockets): cheap on the client side, so
on a 2-core box the server, not the client, is what saturates.
"""
from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from service.launcher import start_service
from loadtests.soak import Result, fire, split_url, worker_pids

API_KEY = "relkey-" + secrets.token_hex(12)  # random: finding it in a log can only mean a leak
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY, MAX_PIXELS, MAX_IMAGES = 3_000_000, 4_000_000, 16
LIMITS = {"IMGSERVE_MAX_BODY_BYTES": str(MAX_BODY), "IMGSERVE_MAX_PIXELS": str(MAX_PIXELS),
          "IMGSERVE_MAX_IMAGES": str(MAX_IMAGES), "IMGSERVE_MAX_LATENCY_MS": "1000"}


def server_env(bundle: Path, **extra: str) -> dict[str, str]:
    return {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": API_KEY, **LIMITS, **extra}


def send(server, request: bytes, timeout: float = 30.0) -> Result:
    """One raw request to ``server``, answered or not."""
    host, port = split_url(server.url)
    return asyncio.run(fire(host, port, request, timeout))


def the_worker(server) -> int:
    """PID of the one BentoML worker (the process that runs the model)."""
    pids = [p for p in worker_pids(server.proc.pid)
            if b"_bentoml_impl.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(pids) == 1, f"expected one worker under pid {server.proc.pid}, found {pids}"
    return pids[0]
