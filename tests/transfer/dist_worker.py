"""Run under torchrun by test_distributed_unit.py: checks the helpers of training/distributed.py
with real gloo collectives and prints one JSON line per rank."""
from __future__ import annotations

import json

import torch
import torch.distributed as dist
import torch.nn as nn

from training.distributed import (broadcast_object, cleanup, init_distributed, make_sampler, reduce_sums,
                                  rewrap, set_epoch, unwrap, wrap_model)


def main() -> None:
    ctx = init_distributed("cpu")
    try:
        data = list(range(11))
        train_sampler = make_sampler(data, ctx, shuffle=True, seed=3)
        set_epoch(train_sampler, 0)
        epoch0 = list(train_sampler)
        set_epoch(train_sampler, 1)
        epoch1 = list(train_sampler)
        eval_shard = list(make_sampler(data, ctx, shuffle=False, seed=3))
        sums = reduce_sums([len(eval_shard), sum(eval_shard), 0.5], ctx)
        run_dir = broadcast_object(f"run-from-rank-{ctx.rank}", ctx)
        # DDP: different data per rank, identical weights after a step (gradients are averaged)
        torch.manual_seed(ctx.rank)  # different init per rank: DDP must broadcast rank 0's
        model = wrap_model(nn.Linear(4, 2), ctx)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(8, 4) + ctx.rank).sum().backward()
        opt.step()
        weights = unwrap(model).weight.detach().flatten().tolist()
        # Gradual unfreezing under DDP: freeze, wrap, step, unfreeze, re-wrap, step; replicas must agree.
        torch.manual_seed(ctx.rank)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        net[0].requires_grad_(False)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        model = wrap_model(net, ctx)
        for step in range(3):
            if step == 1:
                net[0].requires_grad_(True)
                model = rewrap(model, ctx)
            opt.zero_grad()
            model(torch.randn(8, 4) + ctx.rank).pow(2).sum().backward()
            opt.step()
        rewrapped = [p.detach().flatten().tolist() for p in net.parameters()]
        row = json.dumps({"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend,
                          "is_main": ctx.is_main, "epoch0": epoch0, "epoch1": epoch1, "eval": eval_shard,
                          "sums": sums, "run_dir": run_dir, "weights": weights,
                          "wrapped": type(model).__name__, "rewrapped": rewrapped})
        for turn in range(ctx.world_size):  # one rank at a time: lines written together interleave
            if turn == ctx.rank:
                print(row, flush=True)
            dist.barrier()
    finally:
        cleanup(ctx)


if __name__ == "__main__":
    main()
