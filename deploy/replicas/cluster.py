"""N replicas behind HAProxy on loopback: start, roll to a new model one replica at a time, stop.

The state (HAProxy's PID and work directory, each slot's replica) is saved as JSON after every
change, so `down` in another process stops exactly what `up` started, by container ID and PID.
A rolling step does what a Kubernetes Deployment does with maxSurge 1, maxUnavailable 0: start the
new replica, put it in rotation only once its /readyz answers 200, then drain an old one (no new
requests, wait until nothing is in flight) before stopping it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.replicas.haproxy import HAProxy, Settings
from deploy.replicas.runners import Replica, get_runner
from service.launcher import free_port, http_status

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # a fresh container imports BentoML and warms the model on a busy 2-core box
DRAIN_TIMEOUT_S = 90.0  # longer than the service's request timeout (60 s): a drain never cuts a request
STOP_GRACE_S = 20.0


def wait_ready(r: Replica, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Poll the replica's own /readyz until 200 (the readiness gate); seconds taken."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if http_status(r.url + "/readyz", timeout=2) == 200:
            return time.monotonic() - t0
        time.sleep(0.25)
    raise TimeoutError(f"replica {r.ref[:12]} on port {r.port} not ready after {timeout_s:.0f} s; see {r.log or 'its log'}")


@dataclass
class Cluster:
    workdir: Path
    runner: str = "podman"
    image: str = ""
    port: int = 0
    grpc_port: int = 0  # HAProxy's gRPC (h2c) port; 0: the replicas serve no gRPC
    haproxy_pid: int | None = None
    shared: list[str] = field(default_factory=list)  # host folders mounted read-only, same path, in every replica
    slots: list[dict | None] = field(default_factory=list)  # Replica.to_json() or None

    # -- state -----------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    def save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = {k: getattr(self, k) for k in ("runner", "image", "port", "grpc_port", "haproxy_pid", "shared", "slots")}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, workdir: Path) -> "Cluster":
        f = workdir / "state.json"
        if not f.is_file():
            raise SystemExit(f"no replicas running from {workdir} (no {f}); start them with: make replicas N=2")
        return cls(workdir, **json.loads(f.read_text()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def haproxy(self) -> HAProxy:
        return HAProxy(self.workdir, self.haproxy_pid)

    def replicas(self) -> dict[int, Replica]:
        return {i: Replica(**s) for i, s in enumerate(self.slots) if s}

    @property
    def grpc_url(self) -> str:
        """host:port of the balancer's gRPC frontend (what a gRPC client dials)."""
        return f"127.0.0.1:{self.grpc_port}"

    def _ports(self) -> set[int]:
        """Ports this cluster holds or will bind: the balancer's and every replica's."""
        return {self.port, self.grpc_port, *(p for r in self.replicas().values() for p in (r.port, r.grpc_port))}

    def _start(self, env: dict[str, str], bundle: Path | None) -> Replica:
        """One replica on free ports (HTTP, and gRPC when the balancer has a gRPC frontend)."""
        port = free_port(self._ports())
        if self.grpc_port:
            env = {**env, "IMGSERVE_GRPC_PORT": str(free_port(self._ports() | {port}))}
        return get_runner(self.runner).start(self.image, port, env, bundle, self.workdir / "logs", tuple(self.shared))

    # -- life cycle ------------------------------------------------------------------------------
    def up(self, n: int, env: dict[str, str], bundle: Path | None, port: int, settings: Settings | None = None,
           grpc_port: int | None = None) -> None:
        """Start n replicas, wait until each is ready, then HAProxy in front (one spare slot for rolls).
        ``grpc_port`` (0: any free port): the replicas serve gRPC too, balanced on that port."""
        self.port = port or free_port()
        if grpc_port is not None:
            self.grpc_port = grpc_port or free_port({self.port})
        self.slots = [None] * (n + 1)
        self.save()
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            self.slots[i] = self._start(env, bundle).to_json()
            self.save()  # saved at once: `down` cleans up even if start-up fails half way
        for r in self.replicas().values():
            log.info("replica %s on port %d ready after %.1f s", r.ref[:12], r.port, wait_ready(r))
        addrs = [f"127.0.0.1:{s['port']}" if s else None for s in self.slots]
        grpc = [Replica(**s).grpc_port if s else 0 for s in self.slots]
        settings = Settings(**{**vars(settings or Settings()), "bind": f"127.0.0.1:{self.port}",
                               "grpc_bind": f"127.0.0.1:{self.grpc_port}" if self.grpc_port else ""})
        self.haproxy_pid = self.haproxy.start(settings, addrs, grpc)
        self.save()

    def replace(self, old: int, env: dict[str, str], bundle: Path | None) -> int:
        """One rolling step: a new replica takes slot `free`, then the one in slot `old` drains and stops."""
        hap = self.haproxy
        new = self.slots.index(None)
        r = self._start(env, bundle)
        self.slots[new] = r.to_json()
        self.save()
        took = wait_ready(r)
        hap.point(new, r.port, r.grpc_port)
        hap.ready(new)
        hap.wait_status(new, "UP", 30)
        log.info("slot r%d: replica %s (%s) ready after %.1f s, in rotation", new, r.ref[:12], r.models, took)
        self.retire(old)
        return new

    def retire(self, slot: int) -> None:
        """Drain a slot (no new requests, wait for those in flight), take it out, stop its replica."""
        hap = self.haproxy
        hap.drain(slot)
        waited = hap.wait_idle(slot, DRAIN_TIMEOUT_S)
        time.sleep(0.2)  # a request dispatched just before the drain shows up in scur a moment later
        waited += hap.wait_idle(slot, DRAIN_TIMEOUT_S)
        hap.maint(slot)
        old = Replica(**self.slots[slot])
        get_runner(self.runner).stop(old, STOP_GRACE_S)
        self.slots[slot] = None
        self.save()
        log.info("slot r%d: replica %s drained in %.1f s and stopped", slot, old.ref[:12], waited)

    def roll(self, env: dict[str, str], bundle: Path | None) -> None:
        """Replace every replica, one at a time."""
        for slot in sorted(self.replicas()):
            self.replace(slot, env, bundle)

    def down(self) -> None:
        """Stop HAProxy (soft stop), then every replica, by PID and container ID."""
        self.haproxy.stop()
        runner = get_runner(self.runner)
        for r in self.replicas().values():
            runner.stop(r, STOP_GRACE_S)
        self.state_file.unlink(missing_ok=True)

    def describe(self) -> str:
        hap = self.haproxy
        stats = hap.stats() if hap.is_ours() else {}
        lines = [f"HAProxy pid {self.haproxy_pid} on {self.url} ({'running' if stats else 'not running'}); "
                 f"runner {self.runner}, image {self.image or '-'}"]
        for i, s in enumerate(self.slots):
            st = stats.get(f"r{i}", {})
            what = f"{s['ref'][:12]} port {s['port']} models {s['models']}" if s else "(empty)"
            lines.append(f"  r{i}: {st.get('status', '-'):<8} in flight {st.get('scur', '-'):>3}  {what}")
        return "\n".join(lines)
