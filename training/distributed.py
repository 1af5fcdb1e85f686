"""Multi-process training with torchrun: process group, DDP wrapping, sharded sampling, reductions.

``torchrun --nproc_per_node=N -m training ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; without them everything here degrades to a single process (world_size 1, no process
group, no DDP), so the training loop has one code path. NCCL on CUDA, gloo on CPU.

Rules the training loop follows:
- build the model identically on every rank (DDP broadcasts rank 0's weights when it wraps);
- ``make_sampler(train_set, ctx, shuffle=True, seed)`` and ``sampler.set_epoch(epoch)`` each epoch
  (``set_epoch`` below does it for ``None`` too), ``make_sampler(eval_set, ctx, shuffle=False, ...)``
  for evaluation: an exact shard, so summed counts equal the single-process ones;
- evaluate with ``unwrap(model)`` (no collectives inside forward, uneven shards are fine), then
  ``reduce_sums([correct, seen, loss_sum], ctx)``;
- only ``ctx.is_main`` writes logs, plots and checkpoints, from ``unwrap(model).state_dict()``.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sized

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: str | None = None  # None: single process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when present, else cpu; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but no CUDA device is available; use --device cpu")
    return dev


def init_distributed(device: str) -> DistContext:
    """Join the torchrun process group if launched by torchrun, else return a single-process context.

    Under torchrun each process takes ``cuda:LOCAL_RANK`` (one GPU per process, NCCL) or the CPU (gloo).
    """
    base = _resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return DistContext(rank=0, world_size=1, local_rank=0, device=base, is_main=True)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                             f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, dev, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                       is_main=rank == 0, backend=backend)


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DDP around ``model`` (already on ``ctx.device``) when there is more than one process."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def rewrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap again after (un)freezing: DDP only syncs the parameters that were trainable when it wrapped."""
    return wrap_model(unwrap(model), ctx)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (and torch.compile): what checkpoints and evaluation use."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` in order: an exact, unpadded split for evaluation.

    DistributedSampler pads shards to equal length with repeated samples, which would count some
    samples twice in the summed accuracy.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int):
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler
        pass


def make_sampler(dataset: Sized, ctx: DistContext, shuffle: bool, seed: int) -> Sampler | None:
    """Per-rank sampler, or None in a single process (then the DataLoader's own ``shuffle`` applies).

    ``shuffle=True`` (training): DistributedSampler, reshuffled by ``set_epoch``; every rank sees
    ``ceil(N / world)`` samples per epoch. ``shuffle=False`` (evaluation): ShardSampler, exact.
    """
    if not ctx.distributed:
        return None
    if shuffle:
        return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    return ShardSampler(dataset, ctx.rank, ctx.world_size)


def set_epoch(sampler: Sampler | None, epoch: int) -> None:
    """Reshuffle a DistributedSampler for ``epoch`` (no-op for None)."""
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def reduce_sums(values: list[float], ctx: DistContext) -> list[float]:
    """Sum ``values`` over all ranks (all_reduce SUM); unchanged in a single process."""
    if not ctx.distributed:
        return [float(v) for v in values]
    # float64: counts up to 2**53 stay exact. NCCL needs the tensor on the GPU, gloo on the CPU.
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run directory it chose)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. before rank 0 writes what others then read)."""
    if ctx.distributed and dist.is_initialized():
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (call in a ``finally``)."""
    if ctx.distributed and dist.is_initialized():
        # Every rank reaches this point before any tears gloo down: a rank that destroys the group
        # while its peer still has collectives in flight makes the peer abort ("terminate called
        # without an active exception", seen once in CI).
        # On the error path (an exception is propagating) a barrier could wait forever for ranks
        # that are busy elsewhere, so only a clean exit synchronises.
        try:
            if sys.exc_info()[0] is None:
                dist.barrier()
        finally:
            dist.destroy_process_group()


__all__ = ["DistContext", "init_distributed", "wrap_model", "rewrap", "unwrap", "make_sampler", "set_epoch",
           "reduce_sums", "broadcast_object", "barrier", "cleanup", "ShardSampler"]
