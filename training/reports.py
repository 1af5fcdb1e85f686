"""Run reports as PNGs (matplotlib Agg): curves, confusion matrix, predictions grid, first-layer kernels."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch.nn as nn  # noqa: E402

log = logging.getLogger(__name__)

GRID_SIDE = 10  # predictions grid: 10x10 random test images, as in seeds/002


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Train/val loss and accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, label=split, markersize=3)
        ax_acc.plot(epochs, [100 * h[f"{split}_acc"] for h in history], style, label=split, markersize=3)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross entropy")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="%")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Confusion matrix (rows: true, columns: predicted), counts written in the cells when few classes."""
    n = len(class_names)
    side = min(max(4.0, 0.6 * n + 2), 20)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    ticks = range(n)
    labels = class_names if n <= 30 else [str(i) for i in ticks]
    ax.set_xticks(list(ticks), labels, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center", fontsize=8)
    ax.set_yticks(list(ticks), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.2%})")
    if n <= 20:
        thresh = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > thresh else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_predictions(test_set, preds: np.ndarray, class_names: list[str], path: Path, seed: int = 0) -> Path:
    """A grid of random test images titled "pred (true)"; wrong ones in red, right ones in green (seeds/002)."""
    rng = np.random.default_rng(seed)
    k = min(GRID_SIDE * GRID_SIDE, len(preds))
    idx = np.sort(rng.choice(len(preds), size=k, replace=False))
    cols = min(GRID_SIDE, k)
    rows = max(1, -(-k // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    wrong = 0
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        img, label = test_set[int(i)]
        ok = int(preds[i]) == int(label)
        wrong += not ok
        ax.imshow(np.asarray(img), cmap="gray" if img.mode == "L" else None)
        ax.set_title(f"{class_names[int(preds[i])][:10]}\n({class_names[int(label)][:10]})",
                     fontsize=8, color="green" if ok else "red")
    fig.suptitle(f"{k - wrong}/{k} right: predicted (true); wrong in red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def plot_kernels(model: nn.Module, path: Path, max_kernels: int = 64) -> Path | None:
    """First-layer conv kernels (seeds/004); RGB when the layer sees 3 channels. None when no conv (mlp)."""
    conv = first_conv(model)
    if conv is None:
        return None
    w = conv.weight.detach().float().cpu().numpy()[:max_kernels]   # (out, in, k, k)
    n = w.shape[0]
    cols = min(8, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, w):
        if k.shape[0] == 3:
            img = np.transpose(k, (1, 2, 0))
            img = (img - img.min()) / (np.ptp(img) + 1e-8)
            ax.imshow(img, interpolation="nearest")
        else:
            ax.imshow(k.mean(0), cmap="gray", interpolation="nearest")
    fig.suptitle(f"first conv layer: {n} of {conv.out_channels} kernels, {conv.kernel_size[0]}x{conv.kernel_size[1]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(run_dir: Path, model: nn.Module, metrics: dict[str, Any], splits, preds: np.ndarray,
                  targets: np.ndarray) -> dict[str, str | None]:
    """Write every PNG into ``run_dir``; returns {name: path or None when skipped}."""
    run_dir = Path(run_dir)
    out: dict[str, str | None] = {
        "curves": str(plot_curves(metrics["history"], run_dir / "curves.png")) if metrics["history"] else None,
        "confusion_matrix": str(plot_confusion(np.asarray(metrics["confusion_matrix"]), splits.class_names,
                                               run_dir / "confusion_matrix.png")),
        "predictions": str(plot_predictions(splits.test, preds, splits.class_names, run_dir / "predictions.png")),
    }
    kernels = plot_kernels(model, run_dir / "kernels.png")
    out["kernels"] = str(kernels) if kernels else None
    if kernels is None:
        log.info("kernels.png skipped: %s has no conv layer", type(model).__name__)
    return out
