"""How many CPUs this process may really use: its affinity, capped by its cgroup's CPU quota.

`sched_getaffinity` sees every core of the host under `docker run --cpus=2`, `podman run --cpus=2` or
a Kubernetes CPU limit, because a quota limits CPU *time*, not cores: a 64-core host with a 2-CPU
limit would run 64 intra-op threads, which the kernel then throttles. The quota is read where the
kernel publishes it:

- cgroup v2: ``cpu.max`` = ``"<quota> <period>"`` or ``"max <period>"`` (no limit);
- cgroup v1: ``cpu.cfs_quota_us`` (``-1``: no limit) and ``cpu.cfs_period_us``.

The process's own cgroup (``/proc/self/cgroup``) is looked up under the mount, with the mount's root
as the fallback: inside a container the cgroup directory is mounted at the root of the hierarchy
while ``/proc/self/cgroup`` may still name the host's path (cgroup v1 has no namespace). A fractional
quota rounds up (1.5 CPUs -> 2 threads), as Kubernetes' downward API rounds ``limits.cpu``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_MOUNT = "sys/fs/cgroup"


def cpu_count(root: Path = Path("/")) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup CPU quota when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cores, math.ceil(quota)) if quota is not None else cores)


def cpu_quota(root: Path = Path("/")) -> float | None:
    """The cgroup CPU quota in CPUs (quota / period), or None when there is none or it cannot be read.
    `root` is the filesystem root (tests pass a folder with fake /proc and /sys files)."""
    paths = _cgroup_paths(root / "proc" / "self" / "cgroup")
    mount = root / CGROUP_MOUNT
    if "" in paths:  # the unified (v2) hierarchy; on hybrid hosts it may hold no controllers
        for d in _candidates(mount, paths[""]) + _candidates(mount / "unified", paths[""]):
            quota = _read_v2(d / "cpu.max")
            if quota is not _MISSING:
                return quota
    for controllers in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for d in _candidates(mount / controllers, paths.get("cpu", "/")):
            quota = _read_v1(d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us")
            if quota is not _MISSING:
                return quota
    return None


_MISSING = object()  # no such file here: look at the next candidate


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """/proc/self/cgroup lines ``ID:CONTROLLERS:PATH`` -> {controller: path}; v2's empty controller list is ``""``."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return {"": "/", "cpu": "/"}
    out: dict[str, str] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out


def _candidates(mount: Path, path: str) -> list[Path]:
    """The process's own cgroup directory under `mount`, then the mount's root (a container's view)."""
    own = mount / path.lstrip("/")
    return [own, mount] if own != mount else [mount]


def _read_v2(cpu_max: Path):
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return _MISSING
    return None if quota == "max" else _ratio(quota, period)


def _read_v1(quota_file: Path, period_file: Path):
    try:
        quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
    except OSError:
        return _MISSING
    return None if quota.startswith("-") else _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
