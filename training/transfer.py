"""Transfer learning: load pretrained weights, freeze, unfreeze (at once or on a schedule), per-group lr.

Pretrained weights come from torchvision's ImageNet weights (``--pretrained imagenet``; seeds/001,
seeds/002) or from a file (``--pretrained PATH``: an imgserve checkpoint or a plain torchvision
state_dict). Layers that cannot carry over are reported, never silently dropped:

- the classifier head (``get_model_spec(name).classifier``) is always re-initialised: it belongs to
  the new task (seeds/001 replaces ResNet's ``fc`` with a 20-class layer);
- the input conv going 3 -> 1 channel gets the sum of the RGB filters (a grey pixel ``g`` seen as
  ``(g, g, g)`` gives the same response); 1 -> 3 gets the filter divided by 3 on each channel;
- the input conv with another kernel (the small 3x3 stem of 28 px ResNets vs ImageNet's 7x7) is
  re-initialised;
- anything else that is missing, unexpected or of another shape is an error: the weights belong to
  another architecture.

Freezing works on parameter names in ``model.named_parameters()`` order, so ``--unfreeze-from
layer4.0.conv1`` means "``layer4.0.conv1.weight`` and every parameter after it".
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torchvision

from training.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

# Registry name -> torchvision weights enum. The hand-built ResNet-18 uses torchvision's module names,
# so ImageNet ResNet-18 weights load into it as well.
IMAGENET_WEIGHTS: dict[str, str] = {
    "resnet18": "ResNet18_Weights",
    "resnet18_scratch": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "resnet152": "ResNet152_Weights",
}

# Seconds a download may stall before we give up; offline machines should fail fast, not hang.
DOWNLOAD_TIMEOUT_S = float(os.environ.get("IMGSERVE_DOWNLOAD_TIMEOUT", "30"))


class PretrainedError(ValueError):
    """Pretrained weights that cannot be found or do not fit the model; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Getting a source state_dict
# ---------------------------------------------------------------------------------------------

def hub_checkpoint_dir() -> Path:
    """Where torch hub caches downloaded weights: ``$TORCH_HOME/hub/checkpoints`` (default ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights(model_name: str, variant: str | None = None):
    """The torchvision weights enum member for ``model_name`` (``DEFAULT`` unless ``variant`` is given)."""
    if model_name not in IMAGENET_WEIGHTS:
        raise PretrainedError(f"no ImageNet weights for model {model_name!r}; models with ImageNet weights: "
                              f"{', '.join(sorted(IMAGENET_WEIGHTS))} (or use --pretrained PATH)")
    enum = getattr(torchvision.models, IMAGENET_WEIGHTS[model_name])
    if variant is None:
        return enum.DEFAULT
    try:
        return enum[variant]
    except KeyError:
        raise PretrainedError(f"unknown weights {variant!r} for {model_name}; valid: "
                              f"{', '.join(m.name for m in enum)}") from None


def imagenet_state_dict(model_name: str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """ImageNet weights from the torch hub cache, downloading them there when the network allows.

    Raises PretrainedError naming the cache file and the ``--pretrained PATH`` alternative when the
    file is not cached and cannot be downloaded.
    """
    weights = imagenet_weights(model_name, variant)
    cache_dir = hub_checkpoint_dir()
    filename = weights.url.rsplit("/", 1)[-1]
    cached = cache_dir / filename
    if cached.is_file():
        log.info("loading ImageNet weights %s from the hub cache %s", weights, cached)
        return _load_state_dict_file(cached)
    log.info("ImageNet weights %s are not in %s; downloading %s", weights, cache_dir, weights.url)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # check_hash: the file name carries the first digits of its sha256; a truncated download fails.
        return torch.hub.load_state_dict_from_url(weights.url, model_dir=str(cache_dir), progress=False,
                                                  check_hash=True, weights_only=True)
    except Exception as e:  # URLError, timeouts, HTTP errors, hash mismatch: all mean "not available"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedError(
            f"ImageNet weights for {model_name} are not cached and could not be downloaded ({reason}); "
            f"put {filename} (from {weights.url}) in {cache_dir} (set TORCH_HOME to use another cache), "
            f"or pass --pretrained PATH with a checkpoint or torchvision state_dict") from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict saved with torch.save, loaded safely (weights_only=True)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedError(f"cannot load pretrained weights {path}: {first}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # a common wrapper ({"state_dict": ..., "epoch": ...})
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PretrainedError(f"{path} is neither an imgserve checkpoint nor a state_dict (a dict of tensors)")
    return data


def source_state_dict(model_name: str, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, description) for ``source``: "imagenet", "imagenet:VARIANT" or a file path."""
    if source == "imagenet" or source.startswith("imagenet:"):
        variant = source.partition(":")[2] or None
        return imagenet_state_dict(model_name, variant), f"imagenet ({imagenet_weights(model_name, variant)})"
    path = Path(source)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {source}: no such file; give a checkpoint path or 'imagenet'")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError:
        sd = _load_state_dict_file(path)  # not ours: a plain torchvision state_dict
        desc = f"state_dict {path}"
    else:
        sd = ckpt["state_dict"]
        desc = f"checkpoint {path} ({ckpt['model']['name']}, {ckpt['num_classes']} classes)"
    # Weights saved from a DDP-wrapped model carry a "module." prefix.
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, desc


# ---------------------------------------------------------------------------------------------
# Matching a source state_dict to a model
# ---------------------------------------------------------------------------------------------

def _under(name: str, prefix: str) -> bool:
    """True if parameter/buffer ``name`` lies in module ``prefix`` (or is exactly ``prefix``)."""
    return name == prefix or name.startswith(prefix + ".")


def _adapt_input_conv(src: torch.Tensor, dst_shape: torch.Size) -> torch.Tensor | None:
    """Adapt an input conv's weight (out, in, kh, kw) to another channel count, or None if it can't."""
    if src.dim() != 4 or src.shape[0] != dst_shape[0] or src.shape[2:] != dst_shape[2:]:
        return None
    if src.shape[1] == 3 and dst_shape[1] == 1:
        return src.sum(dim=1, keepdim=True)          # grey g == RGB (g, g, g): same response
    if src.shape[1] == 1 and dst_shape[1] == 3:
        return src.repeat(1, 3, 1, 1) / 3.0          # (g, g, g) input gives the 1-channel response
    return None


def load_pretrained(model: nn.Module, model_name: str, source: str, in_channels: int,
                    keep_head: bool = False) -> dict[str, Any]:
    """Load pretrained weights from ``source`` into ``model`` (in place) and report what happened.

    Returns ``{"source", "loaded", "adapted", "reinitialised", "mismatched"}``: lists of state_dict
    keys (``mismatched``: ``{key: [source shape, model shape]}`` for the re-initialised ones).
    ``keep_head=True`` also loads the classifier when its shapes match (e.g. serving ImageNet as is).
    Raises PretrainedError when the weights belong to another architecture.
    """
    from training.models import get_model_spec

    head = get_model_spec(model_name).classifier
    src, desc = source_state_dict(model_name, source)
    dst = model.state_dict()
    # The input conv is the model's first parameter; its shape may legitimately differ (channels, stem).
    input_conv = next(n for n, _ in model.named_parameters())
    report: dict[str, Any] = {"source": desc, "loaded": [], "adapted": [], "reinitialised": [], "mismatched": {}}
    new_sd: dict[str, torch.Tensor] = {}
    errors: list[str] = []

    head_matches = all(k in src and src[k].shape == v.shape for k, v in dst.items() if _under(k, head))
    for key, target in dst.items():
        if _under(key, head) and not (keep_head and head_matches):
            report["reinitialised"].append(key)
            if key in src and src[key].shape != target.shape:
                report["mismatched"][key] = [list(src[key].shape), list(target.shape)]
            continue
        if key not in src:
            if key.endswith("num_batches_tracked"):  # older state_dicts lack it; the count is harmless
                continue
            errors.append(f"missing {key}")
            continue
        value = src[key]
        if value.shape == target.shape:
            new_sd[key] = value.to(target.dtype)
            report["loaded"].append(key)
            continue
        if key == input_conv:
            adapted = _adapt_input_conv(value, target.shape)
            if adapted is not None:
                new_sd[key] = adapted.to(target.dtype)
                report["adapted"].append(key)
            else:
                report["reinitialised"].append(key)
            report["mismatched"][key] = [list(value.shape), list(target.shape)]
            continue
        errors.append(f"{key} has shape {list(value.shape)} in the weights but {list(target.shape)} in the model")
    unexpected = [k for k in src if k not in dst and not _under(k, head)]
    errors += [f"unexpected {k}" for k in unexpected]
    if errors:
        more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
        raise PretrainedError(f"{desc} does not fit model {model_name!r}: {'; '.join(errors[:3])}{more}; "
                              f"pass the --model the weights were trained with")
    model.load_state_dict(new_sd, strict=False)  # strict=False: the re-initialised keys keep their init
    log.info("pretrained %s: %d tensors loaded, %d adapted (%s), %d re-initialised (%s)", desc,
             len(report["loaded"]), len(report["adapted"]), ", ".join(report["adapted"]) or "-",
             len(report["reinitialised"]), _summarise(report["reinitialised"]))
    return report


def _summarise(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n})" if len(keys) > n else "") if keys else "-"


# ---------------------------------------------------------------------------------------------
# Freezing
# ---------------------------------------------------------------------------------------------

def _freeze_none(model: nn.Module, classifier_prefix: str) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _freeze_backbone(model: nn.Module, classifier_prefix: str) -> None:
    """seeds/002: everything but the head is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(_under(name, classifier_prefix))


FREEZE_POLICIES: dict[str, Callable[[nn.Module, str], None]] = {
    "none": _freeze_none,
    "backbone": _freeze_backbone,
}


def _matching(model: nn.Module, prefix: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if _under(n, prefix)]


def _require_prefix(model: nn.Module, prefix: str, flag: str) -> None:
    if not _matching(model, prefix):
        tops = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
        raise ValueError(f"{flag} {prefix!r} names no parameter of this model; use a parameter or module "
                         f"name from model.named_parameters(), e.g. {', '.join(tops)} or layer4.0.conv1")


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def apply_freeze(model: nn.Module, classifier_prefix: str, freeze: str | None,
                 unfreeze_from: str | None, keep_trainable: Iterable[str] = ()) -> list[str]:
    """Set ``requires_grad`` by policy and return the names of the trainable parameters.

    ``freeze``: a FREEZE_POLICIES name (None = "none"). ``unfreeze_from``: a parameter or module name;
    it and every parameter after it in ``named_parameters()`` order train, those before it are frozen
    (seeds/001: ``layer4.0.conv1``). The head always trains. ``keep_trainable``: state_dict keys that
    must train anyway (e.g. ``load_pretrained``'s re-initialised input conv: freezing it would freeze
    random filters).
    """
    policy = FREEZE_POLICIES.get(freeze or "none")
    if policy is None:
        raise ValueError(f"unknown --freeze {freeze!r}; valid: {', '.join(FREEZE_POLICIES)}")
    policy(model, classifier_prefix)
    if unfreeze_from:
        _require_prefix(model, unfreeze_from, "--unfreeze-from")
        names = [n for n, _ in model.named_parameters()]
        start = next(i for i, n in enumerate(names) if _under(n, unfreeze_from))
        for i, (name, p) in enumerate(model.named_parameters()):
            p.requires_grad_(i >= start or _under(name, classifier_prefix))
    keep = set(keep_trainable)
    for name, p in model.named_parameters():
        if name in keep or _under(name, classifier_prefix):
            p.requires_grad_(True)
    names = trainable_names(model)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable: %d of %d parameter tensors (%d of %d weights)",
             len(names), len(list(model.parameters())), n_train, total)
    return names


def parse_unfreeze_schedule(text: str) -> dict[int, list[str]]:
    """Parse ``"3:layer4,6:layer3"`` (epoch:prefix, 1-based epochs) into ``{3: ["layer4"], 6: ["layer3"]}``.

    At the start of epoch E the listed prefixes become trainable. ``+`` joins several prefixes for one
    epoch (``"3:layer4+layer3"``); repeating an epoch adds to it.
    """
    schedule: dict[int, list[str]] = {}
    if not text or not text.strip():
        return schedule
    for item in text.split(","):
        epoch_s, sep, prefixes = item.strip().partition(":")
        try:
            epoch = int(epoch_s)
        except ValueError:
            epoch = 0
        parts = [p.strip() for p in prefixes.split("+") if p.strip()]
        if not sep or epoch < 1 or not parts:
            raise ValueError(f"bad --unfreeze-at item {item.strip()!r}; expected EPOCH:PREFIX[,EPOCH:PREFIX...] "
                             f"with 1-based epochs, e.g. 3:layer4,6:layer3")
        schedule.setdefault(epoch, []).extend(parts)
    return dict(sorted(schedule.items()))


def validate_schedule(model: nn.Module, schedule: dict[int, list[str]]) -> None:
    """Fail before training, not at epoch 6, when a scheduled prefix names no parameter."""
    for prefixes in schedule.values():
        for prefix in prefixes:
            _require_prefix(model, prefix, "--unfreeze-at")


def unfreeze(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Make every parameter under ``prefixes`` trainable; return the names that were frozen until now.

    The optimizer must already hold these parameters (``param_groups(..., include_frozen=True)``) and a
    DDP model must be re-wrapped (``distributed.rewrap``): DDP only syncs what was trainable when wrapped.
    """
    newly: list[str] = []
    for prefix in prefixes:
        _require_prefix(model, prefix, "--unfreeze-at")
        for name, p in model.named_parameters():
            if _under(name, prefix) and not p.requires_grad:
                p.requires_grad_(True)
                newly.append(name)
    log.info("unfroze %s: %d parameter tensors", "+".join(prefixes), len(newly))
    return newly


def keep_frozen_bn_eval(model: nn.Module) -> list[str]:
    """Put BatchNorm layers whose parameters are all frozen in eval mode; call after every ``model.train()``.

    Otherwise their running mean/var would drift towards the new data while the frozen conv weights
    around them still expect the pretrained statistics. Returns the names of those modules.
    """
    names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
                names.append(name)
    return names


def param_groups(model: nn.Module, lr: float, backbone_lr: float | None, classifier_prefix: str,
                 include_frozen: bool = False) -> list[dict]:
    """Optimizer param groups: the head at ``lr``, the backbone at ``backbone_lr`` (default ``lr``).

    Only trainable parameters by default. ``include_frozen=True`` (gradual unfreezing) also puts frozen
    backbone parameters in the backbone group: optimizers skip parameters whose ``grad`` is None, so
    they stay untouched until unfrozen, and no group has to be added mid-run (which lr schedulers
    would not know about).
    """
    head, backbone = [], []
    for name, p in model.named_parameters():
        if not (p.requires_grad or include_frozen):
            continue
        (head if _under(name, classifier_prefix) else backbone).append(p)
    groups = []
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr if backbone_lr is not None else lr, "name": "backbone"})
    if head:
        groups.append({"params": head, "lr": lr, "name": "head"})
    if not groups:
        raise ValueError("no trainable parameters: check --freeze / --unfreeze-from")
    return groups
