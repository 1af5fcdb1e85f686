"""Threads from the CPU quota in a container: `--cpus=1` gives one intra-op thread with no
IMGSERVE_THREADS set (service/cpus.py reads the cgroup's quota; the affinity alone would see every
core of the host). The same image without a quota uses the host's cores, so the check can fail."""
from __future__ import annotations

import os

import httpx
import pytest

from ctr_run import READ_ONLY, start_container

# The digits model is small: the service would give it one thread whatever the quota
# (service/models.py _tune_small_model); 0 ms turns that off so the thread count shows the quota.
NO_SMALL_MODEL_TUNING = {"IMGSERVE_SMALL_MODEL_MS": "0"}


def served_threads(engine, image: str, args: list[str]) -> int:
    box = start_container(engine, image, env=NO_SMALL_MODEL_TUNING, args=[*READ_ONLY, *args])
    try:
        return httpx.get(box.url + "/models", timeout=10).json()["models"][0]["intra_op_threads"]
    finally:
        box.remove()


def test_cpu_quota_sets_the_intra_op_threads(engine, cpu_image) -> None:
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: a one-CPU quota would not change the thread count")
    assert served_threads(engine, cpu_image["alias"], ["--cpus=1"]) == 1, "--cpus=1 must give 1 intra-op thread"
    assert served_threads(engine, cpu_image["alias"], []) == cores, "without a quota: one thread per core"
