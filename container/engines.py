"""Container engines, a registry: name -> how to call it, its environment and its build options.

``podman`` and ``docker`` both build through ``bentoml containerize --backend NAME``; what differs is
what the host needs around it (podman's runtime settings on cgroup-v1 hosts, the build host's CA
bundle for TLS-intercepting proxies), which is passed per call and never written into an image.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imgformat.registry import Registry

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# crun (podman's default runtime) fails on hosts with hybrid/v1 cgroups ("cgroups in hybrid mode not
# supported", then setrlimit): runc with the cgroupfs manager works there. Hosts without systemd
# cannot use the systemd cgroup manager either.
PODMAN_COMPAT_CONF = """\
# Written by container/engines.py for this host (cgroup v1 or no systemd); see docs/container.md.
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


@dataclass
class Engine:
    name: str
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every call
    build_opts: list[str] = field(default_factory=list)  # `bentoml containerize --opt` values

    def cmd(self, *args: str) -> list[str]:
        return [self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), env={**os.environ, **self.env}, check=check, timeout=timeout,
                              capture_output=True, text=True, **kw)

    def image_exists(self, image: str) -> bool:
        return self.run("image", "inspect", image, check=False).returncode == 0

    def image_size(self, image: str) -> int:
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())


_ENGINES: Registry[Callable[[Path], Engine]] = Registry("engine", keep_order=True)
register_engine = _ENGINES.register
list_engines = _ENGINES.names


def _needs_compat_conf() -> bool:
    unified_cgroups = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    systemd = Path("/run/systemd/system").is_dir()
    return (not unified_cgroups or not systemd) and shutil.which("runc") is not None


@register_engine("podman")
def _podman(workdir: Path) -> Engine:
    env: dict[str, str] = {}
    if "CONTAINERS_CONF" not in os.environ and _needs_compat_conf():
        conf = workdir / "containers.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(PODMAN_COMPAT_CONF)
        env["CONTAINERS_CONF"] = str(conf)
    # Docker's image format: OCI images drop HEALTHCHECK. The host CA bundle is mounted for the
    # build's RUN steps only (the package index may sit behind a TLS proxy); no layer keeps it.
    opts = ["format=docker"]
    if HOST_CA_BUNDLE.is_file():
        opts.append(f"volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro")
    return Engine("podman", env, opts)


@register_engine("docker")
def _docker(workdir: Path) -> Engine:
    return Engine("docker", {}, [])


def get_engine(name: str, workdir: Path) -> Engine:
    """``auto``: docker when its daemon answers, else podman."""
    if name == "auto":
        if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
            name = "docker"
        elif shutil.which("podman"):
            name = "podman"
        else:
            raise SystemExit("no container engine: install podman (apt-get install podman runc) or docker")
    return _ENGINES.get(name, SystemExit, also=("auto",))(workdir)
