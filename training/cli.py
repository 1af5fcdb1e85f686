"""``python -m training`` / ``imgserve-train``: parse flags, call ``train(cfg)``. Nothing else lives here.

User errors (unknown model or dataset, missing data, bad sizes, incompatible --resume, bad transfer
flags) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, fields

from training.checkpoint import CheckpointError, load_checkpoint
from training.datasets import DatasetError, get_dataset_spec, list_datasets
from training.models import get_model_spec, list_models
from training.models.registry import UnknownModelError
from training.train import OPTIMIZERS, SCHEDULERS, TrainConfig, TrainError, train
from training.transfer import PretrainedError

USER_ERRORS = (TrainError, DatasetError, UnknownModelError, CheckpointError, PretrainedError)
DEFAULTS = TrainConfig()


def _head(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--head wants comma-separated widths like 512,256, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"--head widths must be positive, got {text!r}")
    return widths


def build_parser() -> argparse.ArgumentParser:
    """Flags default to "not given" so ``--resume`` can fill them from the checkpoint's config."""
    p = argparse.ArgumentParser(
        prog="python -m training", argument_default=argparse.SUPPRESS,
        description="Train an image classifier; writes best.pt/last.pt, metrics.json, config.json and PNG reports.",
        epilog=f"models: {', '.join(list_models())}\ndatasets: {', '.join(list_datasets())}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    a = p.add_argument
    g = p.add_argument_group("data and model")
    g.add_argument("--model", help=f"registry name (default {d.model}); see --list")
    g.add_argument("--dataset", help=f"registry name (default {d.dataset}); see --list")
    g.add_argument("--data-dir", help="dataset directory (fashion-mnist default: /usr/share/datasets/fashion-mnist)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10/100 (needs the internet)")
    g.add_argument("--image-size", type=int, help="square input side (default: dataset native size, at least the model's minimum)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: the dataset's)")
    g.add_argument("--head", type=_head, help="hidden widths of a dense head, e.g. 512,256 (seeds/002)")
    g.add_argument("--dropout", type=float, help=f"dropout in the head (default {d.dropout})")
    g.add_argument("--limit", type=int, help="cap every split at N samples (stratified; for quick tests)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"(default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), help=f"sgd = momentum SGD (default {d.optimizer})")
    g.add_argument("--lr", type=float, help="learning rate (default: sgd 0.05, adam/adamw 1e-3)")
    g.add_argument("--momentum", type=float, help=f"sgd momentum (default {d.momentum})")
    g.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    g.add_argument("--scheduler", choices=list(SCHEDULERS), help=f"per-epoch lr schedule (default {d.scheduler})")
    g.add_argument("--step-size", type=int, help=f"epochs per step for --scheduler step (default {d.step_size})")
    g.add_argument("--gamma", type=float, help=f"lr factor per step for --scheduler step (default {d.gamma})")
    g.add_argument("--label-smoothing", type=float, help=f"cross-entropy label smoothing (default {d.label_smoothing})")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crop with padding (+ flips where they keep the label); default on")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, help="horizontal flips when augmenting (default: the dataset's)")
    g = p.add_argument_group("transfer learning")
    g.add_argument("--pretrained", metavar="{imagenet,PATH}", help="initial weights: torchvision ImageNet or a checkpoint/state_dict")
    g.add_argument("--freeze", choices=("none", "backbone"), help="freeze everything but the head (seeds/002)")
    g.add_argument("--unfreeze-from", metavar="PARAM", help="train PARAM and every parameter after it, e.g. layer4.0.conv1 (seeds/001)")
    g.add_argument("--unfreeze-at", metavar="E:PREFIX,...", help="gradual unfreezing, e.g. 3:layer4,6:layer3")
    g.add_argument("--backbone-lr", type=float, help="learning rate of the backbone (the head uses --lr)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto = cuda when present (default auto)")
    g.add_argument("--workers", type=int, help=f"DataLoader worker processes (default {d.workers})")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is often faster on a busy machine)")
    g.add_argument("--out", help="run directory (default runs/MODEL-DATASET-TIMESTAMP, or the resumed run's)")
    g.add_argument("--resume", metavar="LAST_PT", help="continue a run from its last.pt; flags not given come from it")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (default on, only on a terminal)")
    a("--list", action="store_true", help="list models and datasets, then exit")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Explicit flags > the resumed checkpoint's config > TrainConfig defaults."""
    given = {k: v for k, v in vars(args).items() if k != "list"}
    base = asdict(DEFAULTS)
    if given.get("resume"):
        base.update({k: v for k, v in load_checkpoint(given["resume"]).get("config", {}).items()
                     if k in base and k not in ("resume", "progress")})
    base.update(given)
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in base.items() if k in names})


def _print_registries() -> None:
    print("models:")
    for name in list_models():
        print(f"  {name:18s} {get_model_spec(name).description}")
    print("datasets:")
    for name in list_datasets():
        print(f"  {name:18s} {get_dataset_spec(name).description}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_rank = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "list", False):
        _print_registries()
        return 0
    try:
        run_dir = train(config_from_args(args))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if main_rank:
        print(f"run: {run_dir}\ncheckpoint: {run_dir / 'best.pt'}\nreport: {run_dir / 'metrics.json'} and {run_dir}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
