"""HAProxy in front of the replicas: its configuration, its process, and its runtime API.

The backend has fixed server slots (``r0``..``rK``); a slot with no replica is in maintenance. A
rolling update points a free slot at a new replica (``set server ... addr``), puts it in rotation,
then drains and retires an old slot: no reload, so no connection is ever dropped by HAProxy itself.
docs/scaleout.md explains each setting; the short reasons are next to them below.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BACKEND = "replicas"
GRPC_BACKEND = "replicas_grpc"  # the same slots, at each replica's gRPC port (IMGSERVE_GRPC_PORT)
SPARE = "127.0.0.1:1"  # address of an empty slot (in maintenance: never connected to)

CONFIG = """\
global
    maxconn {maxconn}
    # One thread: HAProxy needs a few percent of one core here, and the replicas need the rest.
    nbthread 1
    stats socket {socket} mode 600 level admin
    # Retrying a request after the replica died means HAProxy kept a copy of it: only a request that
    # fits in one buffer can be retried, so the buffer holds a typical photo upload (docs/scaleout.md).
    tune.bufsize {bufsize}
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    option dontlog-normal  # log failed or retried requests and server state changes, not every request
    timeout connect 1s
    timeout client {timeout_s}s
    timeout server {timeout_s}s
    timeout http-request 10s
    # How long a request may wait in HAProxy's queue for a free replica connection (server_maxconn)
    # before HAProxy answers 503 itself (with Retry-After: 1, added in the frontend).
    timeout queue {queue_timeout_ms}ms
    # Receive the whole body before choosing a replica: slow uploads tie up HAProxy, not a replica,
    # and the buffered request can be replayed on another replica.
    option http-buffer-request
    # Classification has no side effect, so replaying a request that got no answer is safe.
    # Not retried: any HTTP answer, in particular a replica's 503 (overloaded): passed through with
    # its Retry-After, so an overload is never multiplied into a retry storm.
    retry-on conn-failure empty-response
    retries 3
    option redispatch 1  # every retry goes to another replica

frontend imgserve
    bind {bind}
    http-after-response set-header Retry-After 1 if {{ status 503 }} !{{ res.hdr(Retry-After) -m found }}
    default_backend {backend}
{backend_section}
{grpc}"""

# One backend section for HTTP and gRPC alike. The replica with the fewest requests in flight gets
# the next one (a dynamic algorithm: slots can be re-pointed at runtime). Active checks every
# {inter_ms} ms on the replica's HTTP /readyz; a connection error seen on live traffic marks the
# replica down at once (observe layer4) instead of waiting for {fall} failed checks.
BACKEND_SECTION = """
backend {backend}
    balance leastconn
    http-reuse {http_reuse}
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter {inter_ms} fastinter {fast_ms} downinter {inter_ms} rise {rise} fall {fall} observe layer4 error-limit 1 on-error mark-down{server_maxconn_setting}
{servers}"""

# gRPC (OIP over HTTP/2 cleartext, "h2c") end to end: the frontend speaks HTTP/2 with prior
# knowledge (what gRPC clients send), each server line too. HTTP mode, so HAProxy balances each call,
# not each connection: a client's one long-lived channel still spreads over every replica. The
# health check is the replica's HTTP /readyz on its HTTP port (port, check-proto h1).
GRPC_CONFIG = """
frontend imgserve_grpc
    bind {grpc_bind} proto h2
    default_backend {backend}
{backend_section}
"""


@dataclass(frozen=True)
class Settings:
    bind: str = "127.0.0.1:8080"
    maxconn: int = 1024
    bufsize: int = 262_144  # 256 KiB: a 224 px JPEG upload is 10-60 KB
    timeout_s: int = 65  # longer than the service's own request timeout (IMGSERVE_TIMEOUT_S, 60)
    inter_ms: int = 1000
    fast_ms: int = 250
    rise: int = 2
    fall: int = 2
    grpc_bind: str = ""  # "127.0.0.1:PORT": also balance the replicas' gRPC ports there; "": no gRPC
    # Requests in flight per replica; the rest wait in HAProxy's queue for queue_timeout_ms, then 503.
    # 0: no limit (the replicas' own admission control sheds). docs/performance.md ("Overload"): with
    # a fresh connection per request, a limit keeps the tail short where refusals in Python cost CPU.
    server_maxconn: int = 0
    queue_timeout_ms: int = 5000
    # "always": a request may go over any idle connection to a replica, the first of a client's
    # connection too, so a replica is spared a new connection per request when clients open one each;
    # "safe" (HAProxy's default) reuses only for a client connection's later requests. A connection
    # the replica closed meanwhile is retried (retry-on conn-failure empty-response).
    http_reuse: str = "safe"


def render(settings: Settings, socket_path: Path, slots: list[str | None], grpc_ports: list[int] | None = None) -> str:
    """haproxy.cfg for these slots: ``"127.0.0.1:PORT"`` of a replica, or None for an empty slot;
    ``grpc_ports``: each slot's gRPC port (0 for an empty slot), with ``settings.grpc_bind``."""
    servers = "\n".join(f"    server r{i} {addr}" if addr else f"    server r{i} {SPARE} disabled"
                        for i, addr in enumerate(slots))
    grpc = ""
    if settings.grpc_bind:
        ports = grpc_ports or [0] * len(slots)
        # check-proto on each server line: HAProxy 2.6 takes it from no default-server line.
        lines = [f"    server r{i} 127.0.0.1:{g} proto h2 port {addr.rsplit(':', 1)[1]} check-proto h1" if addr
                 else f"    server r{i} {SPARE} proto h2 check-proto h1 disabled" for i, (addr, g) in enumerate(zip(slots, ports))]
        grpc = GRPC_CONFIG.format(backend=GRPC_BACKEND, backend_section=_backend(GRPC_BACKEND, "\n".join(lines), settings),
                                  **vars(settings))
    return CONFIG.format(socket=socket_path, backend=BACKEND, grpc=grpc, backend_section=_backend(BACKEND, servers, settings),
                         **vars(settings))


def _backend(name: str, servers: str, settings: "Settings") -> str:
    limit = f" maxconn {settings.server_maxconn}" if settings.server_maxconn else ""
    return BACKEND_SECTION.format(backend=name, servers=servers, server_maxconn_setting=limit, **vars(settings))


class HAProxyError(RuntimeError):
    """HAProxy refused a runtime command; the message has its answer."""


class HAProxy:
    """A haproxy process (own session, stopped by PID) and its admin socket."""

    def __init__(self, workdir: Path, pid: int | None = None) -> None:
        self.workdir = Path(workdir).resolve()  # HAProxy takes a relative `stats socket` path for host:port
        self.cfg = self.workdir / "haproxy.cfg"
        self.socket = self.workdir / "haproxy.sock"
        self.log = self.workdir / "haproxy.log"
        self.pid = pid

    def start(self, settings: Settings, slots: list[str | None], grpc_ports: list[int] | None = None) -> int:
        exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(exe).exists():
            raise SystemExit("haproxy is not installed: apt-get install haproxy (scripts/setup.sh does)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg.write_text(render(settings, self.socket, slots, grpc_ports))
        check = subprocess.run([exe, "-c", "-q", "-f", str(self.cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"haproxy refused {self.cfg}:\n{check.stdout}{check.stderr}")
        with open(self.log, "ab") as fh:
            proc = subprocess.Popen([exe, "-db", "-f", str(self.cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"haproxy exited with {proc.returncode}; see {self.log}")
            try:
                self.command("show info")
                return proc.pid
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"haproxy's admin socket {self.socket} did not answer; see {self.log}")

    def is_ours(self) -> bool:
        """True when self.pid is still a haproxy running our configuration (PIDs get reused)."""
        try:
            cmd = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, TypeError):
            return False
        return any(c.endswith(b"haproxy") for c in cmd[:1]) and str(self.cfg).encode() in cmd

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGUSR1 (soft stop: finish what is in flight, then exit), SIGKILL after the grace."""
        if not self.is_ours():
            return
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.is_ours():
            _reap(self.pid)
            time.sleep(0.05)
        if self.is_ours():
            os.kill(self.pid, signal.SIGKILL)
        _reap(self.pid)

    # -- runtime API -----------------------------------------------------------------------------
    def command(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def _admin(self, cmd: str) -> None:
        out = self.command(cmd).strip()
        if out:  # admin commands answer nothing on success
            raise HAProxyError(f"haproxy: {cmd!r}: {out}")

    def stats(self, backend: str = BACKEND) -> dict[str, dict[str, str]]:
        """``show stat`` rows of a backend by server name (r0, r1, ...; "BACKEND": the backend's totals)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows if r["pxname"] == backend}

    def backends(self) -> list[str]:
        """The HTTP backend, and the gRPC one when the configuration has it: a slot is in both."""
        has_grpc = self.cfg.is_file() and f"backend {GRPC_BACKEND}\n" in self.cfg.read_text()
        return [BACKEND, GRPC_BACKEND] if has_grpc else [BACKEND]

    def point(self, slot: int, port: int, grpc_port: int = 0) -> None:
        """Aim an empty (maintenance) slot at a replica on 127.0.0.1:port (gRPC: grpc_port, checked on port)."""
        addrs = {BACKEND: port, GRPC_BACKEND: grpc_port}
        for backend in self.backends():
            out = self.command(f"set server {backend}/r{slot} addr 127.0.0.1 port {addrs[backend]}")
            if "changed" not in out and "no need to change" not in out:
                raise HAProxyError(f"haproxy: set addr of {backend}/r{slot}: {out.strip()}")
            if backend == GRPC_BACKEND:
                self._admin(f"set server {backend}/r{slot} check-port {port}")

    def _each(self, slot: int, state: str) -> None:
        for backend in self.backends():
            self._admin(f"set server {backend}/r{slot} state {state}")

    def ready(self, slot: int) -> None:
        """Put a slot in rotation. HAProxy counts it up at once (then checks it): call this only
        once the replica answered /readyz 200 itself."""
        self._each(slot, "ready")

    def drain(self, slot: int) -> None:
        """No new requests to this slot; what it has in flight finishes."""
        self._each(slot, "drain")

    def maint(self, slot: int) -> None:
        self._each(slot, "maint")

    def in_flight(self, slot: int) -> int:
        return sum(int(self.stats(b)[f"r{slot}"]["scur"] or 0) for b in self.backends())

    def status(self, slot: int) -> str:
        return self.stats()[f"r{slot}"]["status"]

    def wait_status(self, slot: int, prefix: str, timeout_s: float) -> float:
        """Wait until the slot's status starts with ``prefix`` (UP, DOWN, MAINT, DRAIN); seconds taken."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.status(slot).startswith(prefix):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"r{slot} not {prefix} after {timeout_s:.0f} s: {self.status(slot)}")

    def wait_idle(self, slot: int, timeout_s: float) -> float:
        """Wait until a draining slot has nothing in flight; seconds taken."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.in_flight(slot) == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"r{slot} still has {self.in_flight(slot)} requests in flight after {timeout_s:.0f} s")


def _reap(pid: int | None) -> None:
    """Collect the exit status if the process is our child (else it stays a zombie of ours)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, TypeError):
        pass
