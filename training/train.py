"""The training loop: ``train(cfg) -> run_dir``.

One code path for CPU, one GPU (AMP + pinned memory) and torchrun/DDP (training.distributed).
Per epoch it logs train/val loss and accuracy, keeps ``best.pt`` (by val accuracy) and ``last.pt``
(with optimizer/scheduler/scaler state for ``--resume``); at the end it evaluates the best weights on
the test split and writes metrics.json, config.json and the report PNGs (training.reports).
Checkpoints follow docs/FORMATS.md.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from imgformat.preprocess import Preprocessor
from imgformat.spec import imagenet_stats, make_preprocess
from training import distributed as dist
from training import transfer
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.datasets import DataSplits, get_dataset, use_pipeline
from training.models import build_model, get_model_spec
from training.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)

PHOTO_CROP_MIN = 64  # photos at >= 64 px are resized by the shorter side and centre-cropped (ImageNet style)
PHOTO_DEFAULT_MAX = 224  # default input side for photo folders: their native size may be thousands of px


class TrainError(ValueError):
    """A user error in the training configuration; the message names the fix."""


@dataclass
class TrainConfig:
    """Every training option (the CLI flags, kebab-cased). ``None`` means "resolve from the data/model"."""

    model: str = "simple_cnn"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None        # default: dataset native size, at least the model's minimum
    channels: int | None = None          # default: the dataset's
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adam"
    lr: float | None = None              # default: per optimizer (DEFAULT_LR)
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    step_size: int = 5
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = True
    hflip: bool | None = None            # default: the dataset's (True for clothes/photos, False for digits)
    head: list[int] = field(default_factory=list)
    dropout: float = 0.0
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    threads: int | None = None           # torch intra-op threads (default: torch's; 1 is faster on a busy CPU)
    out: str | None = None               # default: runs/MODEL-DATASET-TIMESTAMP (or the resumed run's dir)
    resume: str | None = None
    limit: int | None = None
    pretrained: str | None = None        # "imagenet" or a checkpoint/state_dict path
    freeze: str | None = None            # none | backbone
    unfreeze_from: str | None = None
    unfreeze_at: str | None = None       # "3:layer4,6:layer3"
    backbone_lr: float | None = None
    progress: bool = True                # tqdm bars (they switch themselves off when not on a terminal)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------
# Registries: optimizers and schedulers
# ---------------------------------------------------------------------------------------------
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}

OPTIMIZERS: dict[str, Callable[[list, TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
}

# Stepped once per epoch. "step" is seeds/001's StepLR (step 5).
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, TrainConfig], Any]] = {
    "step": lambda opt, c: torch.optim.lr_scheduler.StepLR(opt, step_size=c.step_size, gamma=c.gamma),
    "cosine": lambda opt, c: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, c.epochs)),
    "none": lambda opt, c: None,
}


# ---------------------------------------------------------------------------------------------
# Transforms and data
# ---------------------------------------------------------------------------------------------
class Transformed(Dataset):
    """``(PIL, label)`` dataset -> ``(tensor, label)`` through ``transform``."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        return self.transform(img), label


def _loader(ds: Dataset, cfg: TrainConfig, sampler, shuffle: bool, pin: bool, generator=None) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=cfg.workers, pin_memory=pin, generator=generator,
                      persistent_workers=cfg.workers > 0)


# ---------------------------------------------------------------------------------------------
# Set-up (all user errors surface here, before any training)
# ---------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    cfg: TrainConfig
    ctx: Any
    splits: DataSplits
    preprocess: dict[str, Any]
    model_kwargs: dict[str, Any]
    model: nn.Module                      # unwrapped, on device
    run_dir: Path
    schedule: dict[int, list[str]]
    pretrained_report: dict[str, Any] | None
    resume_ckpt: dict[str, Any] | None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_image_size(cfg: TrainConfig, splits: DataSplits, model_name: str) -> int:
    """``--image-size`` or the dataset's native size (photos: at most 224), raised to the model's minimum."""
    spec = get_model_spec(model_name)
    if cfg.image_size is not None:
        if cfg.image_size < spec.min_input_size:
            raise TrainError(f"--image-size {cfg.image_size} is too small for model {model_name!r}: "
                             f"use --image-size {spec.min_input_size} or more")
        if cfg.image_size > 1024:
            raise TrainError(f"--image-size {cfg.image_size} is too large: use at most 1024")
        return cfg.image_size
    native = min(splits.native_size, PHOTO_DEFAULT_MAX) if splits.photos else splits.native_size
    return max(native, spec.min_input_size)


def resolve_preprocess(splits: DataSplits, channels: int, image_size: int, pretrained: str | None = None) -> dict[str, Any]:
    """The checkpoint's ``preprocess``: stretch for small datasets, shorter-side crop for photos >= 64 px.

    Normalisation: the dataset's own mean/std, except when fine-tuning ImageNet weights, which
    expect torchvision's ImageNet statistics (the first layers were trained on inputs normalised
    that way; a grey model gets their channel average, matching the summed RGB stem filters of
    ``transfer``). A checkpoint source keeps the target data's statistics: it may come from
    another domain whose statistics this run cannot know."""
    mean, std = splits.stats_for(channels)
    if pretrained == "imagenet":
        mean, std = imagenet_stats(channels)
    policy = "shorter_side_center_crop" if splits.photos and image_size >= PHOTO_CROP_MIN else "stretch"
    return make_preprocess(channels=channels, input_size=image_size, mean=mean, std=std, resize_policy=policy)


def _default_run_dir(cfg: TrainConfig) -> Path:
    if cfg.resume:
        return Path(cfg.resume).parent
    return Path("runs") / f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resume(ckpt: dict[str, Any], path: str, cfg: TrainConfig, model_kwargs: dict[str, Any],
                  class_names: list[str]) -> None:
    """Refuse a checkpoint that is not the same model, data and optimizer as this run."""
    if "optimizer_state" not in ckpt or ckpt.get("optimizer_state") is None:
        raise TrainError(f"cannot resume from {path}: it has no optimizer state (resume from a run's last.pt)")
    old_cfg = ckpt.get("config", {})
    theirs = {"model": ckpt["model"]["name"], "model kwargs": ckpt["model"]["kwargs"],
              "classes": ckpt["class_names"], "optimizer": old_cfg.get("optimizer"),
              "scheduler": old_cfg.get("scheduler")}
    ours = {"model": cfg.model, "model kwargs": model_kwargs, "classes": class_names,
            "optimizer": cfg.optimizer, "scheduler": cfg.scheduler}
    diff = [k for k in ours if json.dumps(ours[k], sort_keys=True) != json.dumps(theirs[k], sort_keys=True)]
    if diff:
        k = diff[0]
        raise TrainError(f"cannot resume from {path}: its {k} is {theirs[k]} but this run's is {ours[k]}; "
                         f"resume with the flags the run was started with (or drop them: they default to the checkpoint's)")


def _prepare(cfg: TrainConfig) -> _Setup:
    """Resolve the config, load data, build the model (pretrained/frozen) and check a resume."""
    if cfg.optimizer not in OPTIMIZERS:
        raise TrainError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.scheduler not in SCHEDULERS:
        raise TrainError(f"unknown scheduler {cfg.scheduler!r}; valid: {', '.join(SCHEDULERS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise TrainError("--epochs and --batch-size must be at least 1")
    get_model_spec(cfg.model)  # unknown model -> error listing the valid ones, before loading any data
    ctx = dist.init_distributed(cfg.device)
    splits = get_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, seed=cfg.seed, limit=cfg.limit)
    channels = cfg.channels or splits.channels
    if channels not in (1, 3):
        raise TrainError(f"--channels must be 1 or 3, got {channels}")
    image_size = resolve_image_size(cfg, splits, cfg.model)
    cfg = replace(cfg, channels=channels, image_size=image_size,
                  lr=cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer],
                  hflip=splits.hflip if cfg.hflip is None else cfg.hflip, head=list(cfg.head))
    preprocess = resolve_preprocess(splits, channels, image_size, cfg.pretrained)
    use_pipeline(splits, Preprocessor.from_manifest(preprocess).decode_bytes)  # files decode as served
    model_kwargs = {"num_classes": splits.num_classes, "in_channels": channels, "input_size": image_size,
                    "head": list(cfg.head), "dropout": cfg.dropout}
    _seed_everything(cfg.seed)  # same initial weights on every rank and every run
    model = build_model(cfg.model, **model_kwargs)

    resume_ckpt = None
    if cfg.resume:
        resume_ckpt = load_checkpoint(cfg.resume)
        _check_resume(resume_ckpt, cfg.resume, cfg, model_kwargs, splits.class_names)
        model.load_state_dict(resume_ckpt["state_dict"])

    classifier = get_model_spec(cfg.model).classifier
    report = None
    if cfg.pretrained and resume_ckpt is None:
        report = transfer.load_pretrained(model, cfg.model, cfg.pretrained, channels)
    schedule = transfer.parse_unfreeze_schedule(cfg.unfreeze_at or "")
    if cfg.freeze or cfg.unfreeze_from or schedule:
        transfer.apply_freeze(model, classifier, cfg.freeze, cfg.unfreeze_from,
                              keep_trainable=(report or {}).get("reinitialised", []))
        transfer.validate_schedule(model, schedule)
        if resume_ckpt is not None:  # replay the unfreeze events that already happened
            for epoch, prefixes in schedule.items():
                if epoch <= resume_ckpt["epoch"]:
                    transfer.unfreeze(model, prefixes)

    run_dir = Path(cfg.out) if cfg.out else _default_run_dir(cfg)
    run_dir = dist.broadcast_object(run_dir, ctx)  # ranks must agree on a timestamped name
    cfg = replace(cfg, out=str(run_dir))
    return _Setup(cfg, ctx, splits, preprocess, model_kwargs, model.to(ctx.device), run_dir, schedule, report,
                  resume_ckpt)


# ---------------------------------------------------------------------------------------------
# One epoch, evaluation
# ---------------------------------------------------------------------------------------------
def _run_epoch(model: nn.Module, loader: DataLoader, criterion, optimizer, scaler, device: torch.device,
               amp: bool, desc: str, progress: bool) -> tuple[float, float, float]:
    """Train one epoch; returns this rank's (loss sum, correct, seen)."""
    loss_sum = correct = seen = 0.0
    bar = tqdm(loader, desc=desc, leave=False, disable=None if progress else True, dynamic_ncols=True)
    # No terminal (nohup, CI logs): tqdm is off, so log a line at each quarter of the epoch instead.
    quarter = max(1, -(-len(loader) // 4)) if progress and bar.disable else 0
    for i, (x, y) in enumerate(bar, 1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)                       # (B, num_classes)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        n = y.shape[0]
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
        if quarter and i % quarter == 0 and i < len(loader):
            log.info("%s: batch %d/%d, loss %.4f, acc %.2f%%", desc, i, len(loader), loss_sum / seen, 100 * correct / seen)
    return loss_sum, correct, seen


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
             collect: bool = False) -> dict[str, Any]:
    """Loss sum, correct and seen over ``loader`` (plain, unwrapped model); optionally preds/targets."""
    model.eval()
    loss_sum = correct = seen = 0.0
    preds, targets = [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        p = logits.argmax(1)
        correct += (p == y).sum().item()
        seen += y.shape[0]
        if collect:
            preds.append(p.cpu())
            targets.append(y.cpu())
    out: dict[str, Any] = {"loss_sum": loss_sum, "correct": correct, "seen": seen}
    if collect:
        out["preds"] = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
        out["targets"] = torch.cat(targets).numpy() if targets else np.zeros(0, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _checkpoint(s: _Setup, state_dict: dict, epoch: int, best_val_acc: float, metrics: dict,
                optimizer=None, scheduler=None, scaler=None) -> dict[str, Any]:
    ckpt = {
        "model": {"name": s.cfg.model, "kwargs": s.model_kwargs},
        "num_classes": s.splits.num_classes, "in_channels": s.model_kwargs["in_channels"],
        "input_size": s.model_kwargs["input_size"], "preprocess": s.preprocess,
        "class_names": list(s.splits.class_names), "dataset": s.splits.info,
        "state_dict": state_dict, "epoch": epoch, "best_val_acc": best_val_acc,
        "metrics": metrics, "config": asdict(s.cfg),
    }
    if optimizer is not None:
        ckpt["optimizer_state"] = optimizer.state_dict()
        ckpt["scheduler_state"] = scheduler.state_dict() if scheduler is not None else None
        ckpt["scaler_state"] = scaler.state_dict() if scaler.is_enabled() else None
    return ckpt


def _extend_cosine(scheduler, optimizer, epochs: int) -> None:
    """Resuming with another --epochs: anneal over the new total from where the run is.

    The lr is set from the closed form because CosineAnnealingLR updates it recursively from the
    current value, which is 0 at the end of a finished schedule (it would stay 0 forever).
    """
    scheduler.T_max = max(1, epochs)
    t = min(scheduler.last_epoch, scheduler.T_max)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * t / scheduler.T_max)) / 2
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    log.info("cosine schedule extended to %d epochs: lr now %.2e", scheduler.T_max, optimizer.param_groups[-1]["lr"])


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in dist.unwrap(model).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.model`` on ``cfg.dataset``; returns the run directory (best.pt, last.pt, reports).

    Raises TrainError (and the registries' DatasetError / UnknownModelError / CheckpointError) for
    configuration mistakes, all before the first epoch.
    """
    t_start = time.time()
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        try:
            s = _prepare(cfg)
        except BaseException as e:
            # under torchrun the process group may already exist: leave it before reporting
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            if not isinstance(e, ValueError):
                raise
            if type(e) is ValueError:  # e.g. build_model's or transfer's argument checks: still a user error
                raise TrainError(str(e)) from None
            raise
        try:
            return _fit(s, t_start)
        finally:
            dist.cleanup(s.ctx)
    finally:
        torch.set_num_threads(threads_before)


def _fit(s: _Setup, t_start: float) -> Path:
    cfg, ctx, net, splits = s.cfg, s.ctx, s.model, s.splits
    device = ctx.device
    cuda = device.type == "cuda"
    amp = cuda  # fp16 autocast only where it pays; identical code path with it disabled on CPU
    if ctx.is_main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        log.info("run %s: %s on %s (%d train / %d val / %d test, %d classes), %dx%d %s, device %s, world %d",
                 s.run_dir, cfg.model, cfg.dataset, len(splits.train), len(splits.val), len(splits.test),
                 splits.num_classes, cfg.image_size, cfg.image_size, s.preprocess["color_mode"], device,
                 ctx.world_size)

    train_ds = Transformed(splits.train, train_transform(s.preprocess, cfg.augment, cfg.hflip))
    ev = eval_transform(s.preprocess)  # the reference pipeline the service reproduces
    val_ds, test_ds = Transformed(splits.val, ev), Transformed(splits.test, ev)
    train_sampler = dist.make_sampler(train_ds, ctx, shuffle=True, seed=cfg.seed)
    gen = torch.Generator()
    train_loader = _loader(train_ds, cfg, train_sampler, shuffle=True, pin=cuda, generator=gen)
    val_loader = _loader(val_ds, cfg, dist.make_sampler(val_ds, ctx, shuffle=False, seed=cfg.seed), False, cuda)

    classifier = get_model_spec(cfg.model).classifier
    if cfg.backbone_lr is not None or s.schedule:
        params = transfer.param_groups(net, cfg.lr, cfg.backbone_lr, classifier, include_frozen=bool(s.schedule))
    else:
        params = [p for p in net.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[cfg.optimizer](params, cfg)
    scheduler = SCHEDULERS[cfg.scheduler](optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    frozen = bool(cfg.freeze or cfg.unfreeze_from or s.schedule)

    history: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    start_epoch, best_val, best_epoch = 1, -1.0, 0
    prior_wall = 0.0  # wall time of the sessions before a --resume
    best_state = _cpu_state(net)
    if s.resume_ckpt is not None:
        r = s.resume_ckpt
        optimizer.load_state_dict(r["optimizer_state"])
        if scheduler is not None and r.get("scheduler_state"):
            scheduler.load_state_dict(r["scheduler_state"])
            if hasattr(scheduler, "T_max") and scheduler.T_max != max(1, cfg.epochs):
                _extend_cosine(scheduler, optimizer, cfg.epochs)
        if amp and r.get("scaler_state"):
            scaler.load_state_dict(r["scaler_state"])
        history = list(r.get("metrics", {}).get("history", []))
        events = list(r.get("metrics", {}).get("unfreeze_events", []))
        start_epoch, best_val = r["epoch"] + 1, float(r.get("best_val_acc", -1.0))
        best_epoch = int(r.get("metrics", {}).get("best_epoch", r["epoch"]))
        prior_wall = float(r.get("metrics", {}).get("wall_time_total_s", sum(h.get("time_s", 0) for h in history)))
        best_pt = Path(cfg.resume).parent / "best.pt"
        if best_pt.is_file():
            best_state = load_checkpoint(best_pt)["state_dict"]
        log.info("resumed from %s at epoch %d (best val acc %.4f)", cfg.resume, r["epoch"], best_val)

    model = dist.wrap_model(net, ctx)
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        # Per-epoch seeds: the data order and augmentation of epoch E do not depend on earlier epochs,
        # so a resumed run repeats exactly what an uninterrupted one would have done.
        torch.manual_seed(cfg.seed * 1000 + epoch)
        gen.manual_seed(cfg.seed * 1000 + epoch)
        dist.set_epoch(train_sampler, epoch)
        if epoch in s.schedule:
            newly = transfer.unfreeze(net, s.schedule[epoch])
            events.append({"epoch": epoch, "prefixes": s.schedule[epoch], "unfrozen": len(newly)})
            model = dist.rewrap(model, ctx)
            if ctx.is_main:
                log.info("epoch %d: unfroze %s (%d parameter tensors)", epoch, "+".join(s.schedule[epoch]), len(newly))
        model.train()
        if frozen:
            transfer.keep_frozen_bn_eval(net)
        lr = optimizer.param_groups[-1]["lr"]
        tl, tc, tn = dist.reduce_sums(list(_run_epoch(
            model, train_loader, criterion, optimizer, scaler, device, amp,
            f"epoch {epoch}/{cfg.epochs}", cfg.progress and ctx.is_main)), ctx)
        v = evaluate(net, val_loader, device, amp)
        vl, vc, vn = dist.reduce_sums([v["loss_sum"], v["correct"], v["seen"]], ctx)
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "train_loss": tl / tn, "train_acc": tc / tn, "val_loss": vl / max(vn, 1),
               "val_acc": vc / max(vn, 1), "lr": lr, "time_s": round(time.time() - t0, 2)}
        history.append(row)
        improved = row["val_acc"] > best_val
        if improved:
            best_val, best_epoch, best_state = row["val_acc"], epoch, _cpu_state(net)
        metrics = {"history": history, "best_epoch": best_epoch, "best_val_acc": best_val, "unfreeze_events": events,
                   "wall_time_total_s": round(prior_wall + time.time() - t_start, 1)}
        if ctx.is_main:
            log.info("epoch %3d/%-3d | train loss %7.4f acc %6.2f%% | val loss %7.4f acc %6.2f%% | lr %.2e | %6.1fs%s",
                     epoch, cfg.epochs, row["train_loss"], 100 * row["train_acc"], row["val_loss"],
                     100 * row["val_acc"], lr, row["time_s"], "  *best" if improved else "")
            if improved:
                save_checkpoint(s.run_dir / "best.pt", _checkpoint(s, best_state, epoch, best_val, metrics))
            save_checkpoint(s.run_dir / "last.pt", _checkpoint(s, _cpu_state(net), epoch, best_val, metrics,
                                                               optimizer, scheduler, scaler))
        dist.barrier(ctx)

    if ctx.is_main:
        _finish(s, best_state, best_epoch, best_val, history, events, t_start, prior_wall, device, amp)
    dist.barrier(ctx)
    return s.run_dir


def _finish(s: _Setup, best_state: dict, best_epoch: int, best_val: float, history: list, events: list,
            t_start: float, prior_wall: float, device: torch.device, amp: bool) -> None:
    """Rank 0: evaluate the best weights on test, write metrics/config/reports, update the checkpoints."""
    from training import reports  # matplotlib is only needed here

    cfg, splits, net = s.cfg, s.splits, s.model
    last_state = _cpu_state(net)
    net.load_state_dict(best_state)
    test_loader = _loader(Transformed(splits.test, eval_transform(s.preprocess)), cfg, None, False, device.type == "cuda")
    t = evaluate(net, test_loader, device, amp, collect=True)
    preds, targets = t["preds"], t["targets"]
    n = splits.num_classes
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    per_class = {name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None)
                 for i, name in enumerate(splits.class_names)}
    metrics = {
        "history": history, "best_epoch": best_epoch, "best_val_acc": best_val,
        "test_loss": t["loss_sum"] / max(t["seen"], 1), "test_acc": t["correct"] / max(t["seen"], 1),
        "per_class_acc": per_class, "confusion_matrix": cm.tolist(),
        "unfreeze_events": events, "pretrained": s.pretrained_report,
        "num_params": sum(p.numel() for p in net.parameters()),
        "sizes": splits.info.get("sizes"), "device": str(device),
        "wall_time_s": round(time.time() - t_start, 1),                     # this invocation
        "wall_time_total_s": round(prior_wall + time.time() - t_start, 1),  # all sessions of the run
    }
    (s.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # Both checkpoints carry the final metrics (export copies them into the bundle manifest).
    epoch = history[-1]["epoch"] if history else 0
    save_checkpoint(s.run_dir / "best.pt", _checkpoint(s, best_state, best_epoch, best_val, metrics))
    last = load_checkpoint(s.run_dir / "last.pt") if (s.run_dir / "last.pt").is_file() else None
    if last is not None:
        last["metrics"] = metrics
        save_checkpoint(s.run_dir / "last.pt", last)
    else:
        save_checkpoint(s.run_dir / "last.pt", _checkpoint(s, last_state, epoch, best_val, metrics))
    reports.write_reports(s.run_dir, net, metrics, splits, preds, targets)
    log.info("test loss %.4f acc %.2f%% (best epoch %d, val acc %.2f%%) | wall %.1fs (run total %.1fs) | %s",
             metrics["test_loss"], 100 * metrics["test_acc"], best_epoch, 100 * best_val,
             metrics["wall_time_s"], metrics["wall_time_total_s"], s.run_dir)
