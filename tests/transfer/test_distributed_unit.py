"""training/distributed.py: single-process fallbacks in-process, real gloo collectives under torchrun."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch.nn as nn

from training.distributed import init_distributed, make_sampler, reduce_sums, unwrap, wrap_model

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend, ctx.distributed) == (0, 1, True, None, False)
    model = nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model and unwrap(model) is model
    assert make_sampler(list(range(5)), ctx, shuffle=True, seed=0) is None
    assert reduce_sums([1, 2.5], ctx) == [1.0, 2.5]


def test_gloo_two_processes(bounded):
    """torchrun --nproc_per_node=2 on CPU: samplers shard, sums reduce, DDP keeps replicas identical."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # --standalone: a local rendezvous on a free port (a static --master_port=0 would hang)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/transfer/dist_worker.py")]
    proc = bounded(cmd, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                  key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1], proc.stdout
    r0, r1 = rows
    assert r0["backend"] == "gloo" and r0["world"] == 2 and r0["is_main"] and not r1["is_main"]
    assert r0["wrapped"] == "DistributedDataParallel"
    # training shards: 11 samples -> 6 per rank (padded), covering everything, reshuffled per epoch
    assert len(r0["epoch0"]) == len(r1["epoch0"]) == 6
    assert set(r0["epoch0"]) | set(r1["epoch0"]) == set(range(11))
    assert (r0["epoch0"], r1["epoch0"]) != (r0["epoch1"], r1["epoch1"]), "set_epoch did not reshuffle"
    # evaluation shards: exact, no padding, so reduced sums equal the single-process ones
    assert sorted(r0["eval"] + r1["eval"]) == list(range(11))
    assert r0["sums"] == r1["sums"] == [11.0, 55.0, 1.0]
    assert r0["run_dir"] == r1["run_dir"] == "run-from-rank-0"
    assert r0["weights"] == pytest.approx(r1["weights"], abs=0), "DDP replicas diverged"
    assert r0["rewrapped"] == r1["rewrapped"], "replicas diverged after unfreezing and re-wrapping"
