"""How a replica runs: a container of the image (podman), or a plain `bentoml serve` process.

Each runner starts one replica serving on 127.0.0.1:PORT, names the host PID of its server process
(for kill -9 in the failover test), and stops it by container ID or PID, never by name. The
``podman`` runner is the stand-in for a Kubernetes pod: read-only root file system with the same
writable tmpfs mounts as deploy/k8s, a non-root user, restart on failure (the kubelet's
restartPolicy), and the bundle, when given, mounted read-only as in overlays/mounted.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from service import launcher

# The one writable place under a read-only root, with BentoML's home in it (as deploy/k8s/base/deployment.yaml).
TMPFS = ("/tmp",)
CONTAINER_ENV = {"BENTOML_HOME": "/tmp/bentoml"}
MODELS_DIR = "/models"


@dataclass
class Replica:
    """One running replica, as saved in the cluster's state file."""

    runner: str
    ref: str  # container ID, or PID of `bentoml serve`
    port: int
    models: str  # the IMGSERVE_MODELS it serves
    log: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_port(self) -> int:
        """Its gRPC port (IMGSERVE_GRPC_PORT; 0: none)."""
        return int(self.env.get("IMGSERVE_GRPC_PORT", 0))

    def to_json(self) -> dict:
        return asdict(self)


def podman():
    """The podman engine of container/ (its host settings: runc, cgroupfs, no default ulimits where needed)."""
    from container.build import WORK
    from container.engines import get_engine

    return get_engine("podman", WORK)


def _run(*args: str, timeout: float = 120) -> str:
    out = podman().run(*args, check=False, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:4])} ... failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


# -- podman ------------------------------------------------------------------------------------
def podman_start(image: str, port: int, env: dict[str, str], bundle: Path | None, log_dir: Path,
                 shared: tuple[str, ...] = ()) -> Replica:
    env = dict(env)
    # Host directories every replica reads at the same path (several bundle versions, the traffic
    # policy's folder): a folder, not a file, so a file replaced in it is seen, as a ConfigMap update is.
    mounts: list[str] = [a for d in shared for a in ("-v", f"{d}:{d}:ro")]
    if bundle is not None:
        inside = f"{MODELS_DIR}/{bundle.name}"
        mounts += ["-v", f"{bundle.resolve()}:{inside}:ro"]
        env["IMGSERVE_MODELS"] = inside
    env = {**CONTAINER_ENV, **env}
    # --no-healthcheck: HAProxy checks /readyz; podman's own checks need systemd timers.
    cmd = ["run", "-d", "--network", "host", "--read-only", "--read-only-tmpfs=false", "--no-healthcheck",
           "--restart", "on-failure", "--label", "imgserve.replica=1",
           *[a for t in TMPFS for a in ("--tmpfs", f"{t}:rw,mode=1777")], *mounts,
           "-e", "BENTOML_HOST=127.0.0.1", "-e", f"BENTOML_PORT={port}", "-e", "IMGSERVE_GRPC_HOST=127.0.0.1",
           *[a for k, v in env.items() for a in ("-e", f"{k}={v}")], image]
    cid = _run(*cmd)
    return Replica("podman", cid, port, env.get("IMGSERVE_MODELS", "(image default)"),
                   str(log_dir / f"replica-{port}.log"), env)


def podman_server_pid(r: Replica) -> int:
    """Host PID of the container's main process (`bentoml serve`)."""
    return int(_run("inspect", "--format", "{{.State.Pid}}", r.ref))


def podman_stop(r: Replica, grace_s: float) -> None:
    """SIGTERM (BentoML finishes what it has in flight), SIGKILL after the grace; logs kept, container removed."""
    engine = podman()
    engine.run("stop", "-t", str(int(grace_s)), r.ref, check=False, timeout=grace_s + 60)
    if r.log:
        logs = engine.run("logs", r.ref, check=False, timeout=60)
        Path(r.log).write_text(logs.stdout + logs.stderr)
    engine.run("rm", "-f", r.ref, check=False, timeout=60)


def podman_restarts(r: Replica) -> int:
    return int(_run("inspect", "--format", "{{.RestartCount}}", r.ref) or 0)


# -- plain process -----------------------------------------------------------------------------
def process_start(image: str, port: int, env: dict[str, str], bundle: Path | None, log_dir: Path,
                  shared: tuple[str, ...] = ()) -> Replica:
    """`bentoml serve` from this checkout (``image`` unused; ``shared`` folders are already where they are):
    for hosts without a container engine."""
    env = dict(env)
    if bundle is not None:
        env["IMGSERVE_MODELS"] = str(bundle.resolve())
    # Its own BentoML home, as a container has: replicas sharing one would share the Prometheus
    # multiprocess directory and each /metrics would add up every replica's counters.
    env.setdefault("BENTOML_HOME", str(log_dir / f"bentoml-home-{port}"))
    log = log_dir / f"replica-{port}.log"
    server = launcher.bentoml_serve(launcher.SERVICE, port, log, env).start()  # the repository's one launcher
    return Replica("process", str(server.pid), port, env.get("IMGSERVE_MODELS", "bundles/default"), str(log), env)


def process_server_pid(r: Replica) -> int:
    return int(r.ref)


def process_stop(r: Replica, grace_s: float) -> None:
    """SIGTERM to the server's session (its workers call setsid: stopped by PID after it), then SIGKILL."""
    from service.launcher import tree_pids

    pid = int(r.ref)
    members = tree_pids(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in members:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in members):
            time.sleep(0.1)


def process_restarts(r: Replica) -> int:
    return 0  # a plain process is not restarted by anyone


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass(frozen=True)
class Runner:
    start: Callable[..., Replica]  # (image, port, env, bundle, log_dir, shared=()) -> the started replica
    server_pid: Callable[[Replica], int]
    stop: Callable[[Replica, float], None]
    restarts: Callable[[Replica], int]


RUNNERS: dict[str, Runner] = {
    "podman": Runner(podman_start, podman_server_pid, podman_stop, podman_restarts),
    "process": Runner(process_start, process_server_pid, process_stop, process_restarts),
}


def get_runner(name: str) -> Runner:
    try:
        return RUNNERS[name]
    except KeyError:
        raise SystemExit(f"unknown runner {name!r}; choose one of: {', '.join(RUNNERS)}") from None
