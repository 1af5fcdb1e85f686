"""Start a server on a free loopback port, wait until it is ready, read its CPU counters, stop it by PID.

The one way this repository starts `bentoml serve`: the tests (``start_service``), loadtests/ (run, bench,
soak, profile) and deploy/replicas' process runner all come here, so neither of those stages imports the
other. The server runs in its own session (setsid); every process it forks (descendants, same session or
group) is found for CPU accounting and stopped by PID afterwards; nothing is ever killed by name.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The service reads its bundles from this variable, a comma list whose first entry is the default
# model (service/config.py).
BUNDLES_ENV = "IMGSERVE_MODELS"


def free_port(exclude: Iterable[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that is not in ``exclude``.

    A port handed out but not bound yet is free again for the kernel, which may hand it out twice:
    callers that pick several ports before binding them pass the ones they already hold.
    """
    taken = set(exclude)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """`root`, its descendants, and whatever is in its session or process group.

    Descendants matter: BentoML's worker calls setsid itself, so session membership alone misses it.
    """
    procs: dict[int, tuple[int, int, int]] = {}   # pid -> (ppid, pgrp, session)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None:   # fields after comm: state ppid pgrp session ...
                procs[int(entry)] = (int(f[1]), int(f[2]), int(f[3]))
    keep = {root} if root in procs else set()
    keep |= {p for p, (_, pg, sid) in procs.items() if sid == root or pg == root}
    changed = True
    while changed:
        changed = False
        for p, (pp, _, _) in procs.items():
            if p not in keep and pp in keep:
                keep.add(p)
                changed = True
    return sorted(keep)


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (+ reaped children's) of these processes, in CPU seconds."""
    total = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:   # fields 14-17 of /proc/PID/stat, i.e. index 11-14 after comm
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes, MiB."""
    pages = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f is not None:
            pages += int(f[21])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def http_status(url: str, timeout: float = 5.0) -> int:
    """Status code of a GET (0 when nothing answered)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


@dataclass
class Server:
    """A server process started in its own session; stop() ends it and whatever it forked, by PID."""

    cmd: list[str]
    url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log_path, "ab")
        log.info("starting: %s (log %s)", " ".join(self.cmd), self.log_path)
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env={**os.environ, **self.env}, stdout=fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        fh.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.pid

    def pids(self) -> list[int]:
        return tree_pids(self.pid)

    def wait_ready(self, path: str = "/readyz", timeout_s: float = 300.0) -> float:
        """Poll until `path` answers 200; returns the seconds it took. Raises RuntimeError on exit/timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode} during start-up; "
                                   f"see {self.log_path}:\n{tail(self.log_path)}")
            if http_status(self.url.rstrip("/") + path, timeout=5) == 200:
                return time.monotonic() - t0
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s at {self.url}{path}; see {self.log_path}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server, then its leftover session members by PID; SIGKILL what outlives the grace."""
        if self.proc is None or self.proc.poll() is not None and not self.pids():
            return
        members = set(self.pids())
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        left = [p for p in members | set(self.pids()) if _alive(p)]
        for p in left:
            _signal(p, signal.SIGTERM)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if _alive(p)]
        for p in left:
            log.warning("SIGKILL leftover pid %d", p)
            _signal(p, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        log.info("server stopped (pid %d)", self.pid)

    def log_tail(self, n: int = 40) -> str:
        """The last n lines of the server's log."""
        return tail(self.log_path, n)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    f = _stat_fields(pid)
    return f is not None and f[0] != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


SERVICE = "service.service:ImgServe"


def bentoml_serve(target: str, port: int, log_path: Path, env: dict[str, str] | None = None) -> Server:
    """`bentoml serve TARGET` on 127.0.0.1:port from the repository root (not started yet)."""
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    cmd = [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    return Server(cmd, f"http://127.0.0.1:{port}", log_path, {"BENTOML_DO_NOT_TRACK": "true", **(env or {})})


def service_server(bundles: list[str], port: int, log_path: Path, extra_env: dict[str, str] | None = None) -> Server:
    """Our BentoML service serving these bundle directories on 127.0.0.1:port (not started yet)."""
    for b in bundles:
        if not (Path(b) / "manifest.json").is_file():
            raise SystemExit(f"{b} is not a bundle (no manifest.json); make one with: python -m export CHECKPOINT --out DIR")
    env = {BUNDLES_ENV: ",".join(str(Path(b).resolve()) for b in bundles), **(extra_env or {})}
    return bentoml_serve(SERVICE, port, log_path, env)


def start_service(env: dict[str, str], log_path: Path, home: Path | None = None, timeout_s: float = 150.0) -> Server:
    """Our service with this environment (IMGSERVE_MODELS and any other IMGSERVE_*, taken as given, a
    broken spec included) on a free port, started and ready. ``home``: a private BENTOML_HOME, so a
    test never touches the user's model store. Raises RuntimeError (after stopping it) when the
    server exits or is not ready in time."""
    server = bentoml_serve(SERVICE, free_port(), log_path, {**({"BENTOML_HOME": str(home)} if home else {}), **env})
    server.start()
    try:
        server.wait_ready(timeout_s=timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
