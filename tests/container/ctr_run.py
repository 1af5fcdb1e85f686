"""A container started from an image on a free 127.0.0.1 port (host network), ready; removed by ID."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from container.engines import Engine
from loadtests.payloads import fashion_pngs, sample_photo_path
from service.launcher import free_port, http_status


LIMITS = {"IMGSERVE_MAX_BODY_BYTES": "3000000", "IMGSERVE_MAX_PIXELS": "4000000", "IMGSERVE_MAX_IMAGES": "4"}
READ_ONLY = ["--read-only", "--tmpfs", "/tmp"]  # what docker needs too; BENTOML_HOME is under /tmp


ROOT = Path(__file__).resolve().parents[2]
IMAGE_NAME = "imgserve-test"


def build_image_cli(engine: Engine, flavour: str, base: str, bundle: Path, tmp: Path) -> dict:
    """`python -m container build` (what `make image` runs) in a private BENTOML_HOME; its report."""
    report = tmp / "image.json"
    env = {**os.environ, "BENTOML_HOME": str(tmp / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "true"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "container", "build", "--flavour", flavour, "--base", base,
                          "--engine", engine.name, "--bundle", str(bundle), "--name", IMAGE_NAME,
                          "--report", str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"image build failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    built = json.loads(report.read_text())
    print(f"\nbuilt {built['image']} in {time.perf_counter() - t0:.0f} s: {built['size_bytes'] / 1e6:.0f} MB, "
          f"base {built['base']}")
    return built


def inputs() -> dict[str, tuple[str, bytes, str]]:
    photo = Path(sample_photo_path("china")).read_bytes()
    fashion = fashion_pngs(1)
    assert fashion, "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (scripts/setup.sh does)"
    return {"photo": ("china.jpg", photo, "image/jpeg"), "fashion": ("fashion0.png", fashion[0].data, "image/png")}


def healthcheck(engine, image: str) -> list[str]:
    """The image's HEALTHCHECK command (docker keeps it in Config, podman next to it)."""
    meta = json.loads(engine.run("image", "inspect", image).stdout)[0]
    hc = (meta.get("Config") or {}).get("Healthcheck") or meta.get("Healthcheck") or {}
    return hc.get("Test") or []


def classify(url: str, upload: tuple[str, bytes, str], headers: dict | None = None, **form) -> httpx.Response:
    return httpx.post(url + "/classify", files={"image": upload}, data=form, headers=headers, timeout=30)


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
