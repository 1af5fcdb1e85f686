"""Real data, real training, real bundle for the service tests (seconds on 2 CPU cores).

scikit-learn's bundled digits (the project's ``digits`` dataset, 8x8 grey), a ``simple_cnn``
trained with a plain loop, saved as a contract checkpoint and exported by ``export.export_bundle``
(with its parity gate). Uploads are the held-out test digits saved as 24x24 PNGs, so serving
really decodes and resizes them.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

UPLOAD_SIZE = 24


def test_digits(n: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """Held-out digits as 24x24 "L" PIL images, and their labels."""
    from training.datasets import get_dataset

    ds = get_dataset("digits", seed=0).test
    imgs = [Image.fromarray(a, "L").resize((UPLOAD_SIZE, UPLOAD_SIZE), Image.BILINEAR) for a in ds.images[:n]]
    return imgs, np.asarray(ds.labels[:n])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def train_checkpoint(path: Path, epochs: int = 8, seed: int = 0) -> Path:
    """simple_cnn on digits' train split; the checkpoint names the dataset so export finds parity samples."""
    import torch
    import torch.nn.functional as F

    from training.checkpoint import save_checkpoint
    from training.datasets import get_dataset
    from training.models import build_model
    from training.transforms import make_preprocess

    torch.manual_seed(seed)
    splits = get_dataset("digits", seed=seed)
    pre = make_preprocess(channels=1, input_size=8, mean=splits.mean, std=splits.std)

    def tensors(ds):
        x = torch.from_numpy(ds.images.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 8, 8)
        return (x - pre["mean"][0]) / pre["std"][0], torch.from_numpy(ds.labels)

    kwargs = {"num_classes": 10, "in_channels": 1, "input_size": 8, "head": [], "dropout": 0.0}
    model = build_model("simple_cnn", **kwargs)
    (xtr, ytr), (xte, yte) = tensors(splits.train), tensors(splits.test)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean())
    save_checkpoint(path, {
        "model": {"name": "simple_cnn", "kwargs": kwargs}, "num_classes": 10, "in_channels": 1, "input_size": 8,
        "preprocess": pre, "class_names": splits.class_names, "dataset": splits.info,
        "state_dict": model.state_dict(), "epoch": epochs, "best_val_acc": acc,
        "metrics": {"test_acc": acc}, "config": {"model": "simple_cnn", "dataset": "digits", "epochs": epochs},
    })
    return path


def make_bundle(checkpoint: Path, out: Path, name: str = "digits", int8: bool = False) -> Path:
    from export import export_bundle

    return export_bundle(checkpoint, out, name=name, version="1", samples=32, int8=int8,
                         calib_samples=64, int8_eval_samples=200)
