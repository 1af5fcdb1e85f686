"""A registry of model builders (the torchvision/timm pattern): names map to small builder functions.

Every builder has the signature ``builder(num_classes, in_channels, input_size, head, dropout, **kwargs)``
and returns an ``nn.Module`` mapping ``(B, in_channels, input_size, input_size)`` float tensors to
``(B, num_classes)`` logits. ``classifier`` names the module prefix of the (replaceable) head, which
transfer learning uses to tell head from backbone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn as nn

from imgformat.registry import Registry


class UnknownModelError(ValueError):
    """Raised for a model name that is not registered; the message lists the valid ones."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    classifier: str  # module prefix of the head, e.g. "fc" for ResNets
    description: str
    min_input_size: int = 8


_MODELS: Registry[ModelSpec] = Registry("model")
list_models = _MODELS.names


def register_model(name: str, *, classifier: str, description: str, min_input_size: int = 8):
    """Decorator: register ``builder`` under ``name``. Duplicate names are a programming error."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS.add(name, ModelSpec(name, builder, classifier, description, min_input_size))
        return builder

    return wrap


def get_model_spec(name: str) -> ModelSpec:
    return _MODELS.get(name, UnknownModelError)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    head: Sequence[int] = (),
    dropout: float = 0.0,
    **kwargs,
) -> nn.Module:
    """Build a registered model. ``head``: hidden widths of an optional dense head (seeds/002)."""
    spec = get_model_spec(name)
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if not spec.min_input_size <= input_size <= 1024:
        raise ValueError(f"input size {input_size} is outside {spec.min_input_size}..1024 for model {name!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return spec.builder(
        num_classes=num_classes, in_channels=in_channels, input_size=input_size,
        head=tuple(head), dropout=dropout, **kwargs,
    )


def make_head(in_features: int, hidden: Sequence[int], num_classes: int, dropout: float) -> nn.Module:
    """Dense head: [Linear -> ReLU -> Dropout] per hidden width, then Linear to the classes.

    With no hidden widths and no dropout it is a single Linear layer (the plain classifier), so
    state_dict keys stay those of the original architectures (e.g. ``fc.weight`` for ResNets).
    """
    if not hidden and dropout == 0.0:
        return nn.Linear(in_features, num_classes)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    if not hidden:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
