"""Checkpoint format (docs/FORMATS.md): save with plain types only, load with ``weights_only=True``."""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
import torchvision

import training
from imgformat.constants import CHECKPOINT_FORMAT as FORMAT, CHECKPOINT_FORMAT_VERSION as FORMAT_VERSION
from imgformat.schema import check_preprocess

REQUIRED_KEYS = ("model", "num_classes", "in_channels", "input_size", "preprocess", "class_names", "state_dict")


class CheckpointError(ValueError):
    """A file that is missing, unreadable, unsafe or not a checkpoint of this project."""


def versions() -> dict[str, str]:
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses
    return {"imgserve": training.__version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "python": platform.python_version()}


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` atomically (temp file + rename), so a crash never leaves a half-written file."""
    path = Path(path)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **ckpt}
    missing = [k for k in REQUIRED_KEYS if k not in data]
    assert not missing, f"checkpoint is missing {missing}"
    check_preprocess(data["preprocess"], "checkpoint preprocess", CheckpointError)  # what export will read
    data["state_dict"] = {k: v.detach().cpu() for k, v in data["state_dict"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely. Raises CheckpointError with a one-line reason for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors carry long multi-line messages: keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint (refused by weights_only loading): {first}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an imgserve checkpoint (no format={FORMAT!r} key)")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {data.get('format_version')!r}; "
                              f"this imgserve reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{path} is missing checkpoint keys: {', '.join(missing)}")
    check_preprocess(data["preprocess"], f"{path}: preprocess", CheckpointError)
    return data


def build_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the model described by a loaded checkpoint and load its weights (eval mode)."""
    from training.models import build_model

    model = build_model(ckpt["model"]["name"], **ckpt["model"]["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
