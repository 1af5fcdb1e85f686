"""A container started from an image on a free 127.0.0.1 port (host network), ready; removed by ID."""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field

from container.engines import Engine
from loadtests.servectl import free_port, http_status


@dataclass
class Container:
    engine: Engine
    cid: str
    url: str
    args: list[str] = field(default_factory=list)

    def logs(self) -> str:
        out = self.engine.run("logs", self.cid, check=False)
        return (out.stdout + out.stderr)[-4000:]

    def exec(self, *cmd: str) -> subprocess.CompletedProcess:
        return self.engine.run("exec", self.cid, *cmd, check=False)

    def state(self) -> dict:
        return json.loads(self.engine.run("inspect", "--format", "{{json .State}}", self.cid).stdout)

    def remove(self) -> None:
        self.engine.run("rm", "-f", "-t", "2", self.cid, check=False, timeout=60)


def start_container(engine: Engine, image: str, env: dict[str, str] | None = None, args: list[str] | None = None,
                    timeout_s: float = 180.0) -> Container:
    """`ENGINE run -d` on the host network, listening on a free 127.0.0.1 port, ready (/readyz 200)."""
    port = free_port()
    cmd = ["run", "-d", "--network=host", "-e", "BENTOML_HOST=127.0.0.1", "-e", f"BENTOML_PORT={port}",
           "-e", "BENTOML_DO_NOT_TRACK=true"]
    for k, v in (env or {}).items():
        cmd += ["-e", f"{k}={v}"]
    cmd += [*(args or []), image]
    cid = engine.run(*cmd).stdout.strip()
    box = Container(engine, cid, f"http://127.0.0.1:{port}", args or [])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not box.state().get("Running"):
            logs = box.logs()
            box.remove()
            raise RuntimeError(f"container exited during start-up:\n{logs}")
        if http_status(box.url + "/readyz", timeout=3) == 200:
            return box
        time.sleep(0.5)
    logs = box.logs()
    box.remove()
    raise RuntimeError(f"container not ready after {timeout_s:.0f} s:\n{logs}")
