"""service/cpus.py: the CPU quota read from fake cgroup v1 and v2 trees (a container's view and a
host's view), and the thread count it gives. The real-quota check is tests/container/test_cpu_quota.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cpus import cpu_count, cpu_quota


def fake_root(tmp: Path, proc_cgroup: str, files: dict[str, str]) -> Path:
    (tmp / "proc" / "self").mkdir(parents=True)
    (tmp / "proc" / "self" / "cgroup").write_text(proc_cgroup)
    for rel, text in files.items():
        f = tmp / "sys" / "fs" / "cgroup" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text + "\n")
    return tmp


V1_HOST_PATH = "4:memory:/libpod_parent/libpod-abc\n3:cpu,cpuacct:/libpod_parent/libpod-abc\n0::/\n"

CASES = {
    # cgroup v2 inside a container (cgroup namespace: the process sits at "/")
    "v2 limit 1.5": ("0::/\n", {"cpu.max": "150000 100000"}, 1.5),
    "v2 no limit": ("0::/\n", {"cpu.max": "max 100000"}, None),
    # cgroup v2 on a host: the process's own cgroup below the mount
    "v2 own cgroup": ("0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "200000 100000",
                                                   "cpu.max": "max 100000"}, 2.0),
    # cgroup v1, host path in /proc/self/cgroup, the container's directory mounted at the root (podman here)
    "v1 container view": (V1_HOST_PATH, {"cpu,cpuacct/cpu.cfs_quota_us": "100000",
                                         "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 1.0),
    "v1 host view": (V1_HOST_PATH, {"cpu,cpuacct/libpod_parent/libpod-abc/cpu.cfs_quota_us": "50000",
                                    "cpu,cpuacct/libpod_parent/libpod-abc/cpu.cfs_period_us": "100000",
                                    "cpu,cpuacct/cpu.cfs_quota_us": "-1",
                                    "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
    "v1 separate cpu mount": ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"}, 3.0),
    "v1 no limit": ("2:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    # hybrid host (this development machine): an empty unified hierarchy, the quota in v1
    "hybrid": ("1:cpu:/\n0::/\n", {"unified/cgroup.procs": "", "cpu/cpu.cfs_quota_us": "200000",
                                   "cpu/cpu.cfs_period_us": "100000"}, 2.0),
    "no cgroup files": ("0::/\n", {}, None),
    "garbage": ("0::/\n", {"cpu.max": "lots 100000"}, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_quota_from_fake_cgroups(tmp_path: Path, name: str) -> None:
    proc, files, want = CASES[name]
    assert cpu_quota(fake_root(tmp_path, proc, files)) == want, name


def test_threads_follow_the_quota_rounded_up_and_never_exceed_the_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    one = fake_root(tmp_path / "a", "0::/\n", {"cpu.max": "100000 100000"})
    half = fake_root(tmp_path / "b", "0::/\n", {"cpu.max": "50000 100000"})
    many = fake_root(tmp_path / "c", "0::/\n", {"cpu.max": f"{(cores + 8) * 100000} 100000"})
    none = fake_root(tmp_path / "d", "0::/\n", {"cpu.max": "max 100000"})
    assert cpu_count(one) == 1 and cpu_count(half) == 1, "a quota of at most one CPU gives one thread"
    assert cpu_count(many) == cores and cpu_count(none) == cores, "no quota (or a larger one): the affinity"
    if cores >= 2:
        onehalf = fake_root(tmp_path / "e", "0::/\n", {"cpu.max": "150000 100000"})
        assert cpu_count(onehalf) == 2, "1.5 CPUs round up, as Kubernetes' downward API rounds limits.cpu"
