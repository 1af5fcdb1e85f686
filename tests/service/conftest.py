"""Session fixtures: a real bundle, and real ``bentoml serve`` processes on free loopback ports.

Servers start in their own process group (``start_new_session``) and are stopped by that PID:
SIGTERM to the group, then SIGKILL if anything outlives 20 s.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from svc_factory import make_bundle

ROOT = Path(__file__).resolve().parents[2]
BENTOML = Path(sys.executable).with_name("bentoml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def start_server(env_extra: dict[str, str], log: Path, home: Path, timeout: float = 120.0) -> Server:
    port = free_port()
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", **env_extra}
    fh = open(log, "wb")
    proc = subprocess.Popen([str(BENTOML), "serve", "service.service:ImgServe", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"bentoml serve not ready after {timeout} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)  # our own session: the server and its workers
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def checkpoint(trained_digits_run) -> Path:
    return trained_digits_run / "best.pt"


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory) -> Path:
    """FP32 + INT8 (export's gate passed) bundle of the digits model."""
    return make_bundle(checkpoint, tmp_path_factory.mktemp("svc-bundle") / "digits", int8=True)


MAIN_ENV = {"IMGSERVE_MAX_BODY_BYTES": "3000000", "IMGSERVE_MAX_PIXELS": "4000000", "IMGSERVE_MAX_IMAGES": "16"}


@pytest.fixture(scope="session")
def server(bundle, tmp_path_factory):
    """The default configuration (eager batcher), two names for the same bundle."""
    tmp = tmp_path_factory.mktemp("svc-main")
    env = {"IMGSERVE_MODELS": f"{bundle},second={bundle}", **MAIN_ENV}
    srv = start_server(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def strict_server(bundle, tmp_path_factory):
    """API key, BentoML's own batcher and at most 4 images in flight: for 401, 503 and the cork path."""
    tmp = tmp_path_factory.mktemp("svc-strict")
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": "s3cret-key", "IMGSERVE_BATCHER": "bentoml",
           "IMGSERVE_MAX_QUEUE": "4", **MAIN_ENV}
    srv = start_server(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    stop_server(srv)
