"""Small models from the seeds: the MLP (seeds/000), the CIFAR-10 tutorial LeNet (seeds/004),
the 2-conv CNN (seeds/001) and the CIFAR-100 CNN family (seeds/003)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from training.models.registry import make_head, register_model


def _flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Number of features ``features`` produces for one input, found by a dry run (no guessing)."""
    with torch.no_grad():
        # batch of 2: BatchNorm in training mode refuses a single value per channel
        return features(torch.zeros(2, in_channels, input_size, input_size)).flatten(1).shape[1]


class MLP(nn.Module):
    """seeds/000 SimpleNeuralNetwork: flatten -> one hidden layer -> output."""

    def __init__(self, num_classes, in_channels, input_size, head, dropout, hidden: int = 128):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(nn.Linear(in_channels * input_size * input_size, hidden), nn.ReLU(inplace=True))
        self.classifier = make_head(hidden, head, num_classes, dropout)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.hidden(self.flatten(x)))


class LeNet(nn.Module):
    """The PyTorch CIFAR-10 tutorial ``Net`` (seeds/004), same layer names so tutorial state_dicts load.

    At 32x32 it is exactly the tutorial's network (fc1 has 16*5*5 inputs). Below 32 px the convs
    get padding 2 so small inputs (down to 8x8) still have a feature map; fc1 follows the real size.
    """

    def __init__(self, num_classes, in_channels, input_size, head, dropout):
        super().__init__()
        pad = 0 if input_size >= 32 else 2
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad)
        feats = _flat_features(self._features, in_channels, input_size)
        self.fc1 = nn.Linear(feats, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = make_head(84, head, num_classes, dropout)

    def _features(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        return self.pool(torch.relu(self.conv2(x)))

    def forward(self, x):
        x = torch.flatten(self._features(x), 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def _conv_stack(in_channels: int, plan: Sequence[int | str], input_size: int, bn: bool = True) -> nn.Sequential:
    """Convs from a plan like ``[32, 32, "M", 64]``: an int is conv3x3(+BN)+ReLU, "M" a 2x2 max-pool.

    A pool is skipped when the map is already 1 px, so deep plans still accept 8x8 inputs.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, input_size
    for step in plan:
        if step == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            continue
        layers.append(nn.Conv2d(channels, step, 3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(step))
        layers.append(nn.ReLU(inplace=True))
        channels = step
    return nn.Sequential(*layers)


def _fc_stack(in_features: int, widths: Sequence[int], bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers.append(nn.Linear(in_features, w, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU(inplace=True))
        in_features = w
    return nn.Sequential(*layers)


class PlanCNN(nn.Module):
    """conv plan -> flatten -> FC stack -> head. Used by simple_cnn and the seeds/003 family."""

    def __init__(self, num_classes, in_channels, input_size, head, dropout, *,
                 plan, fc_widths, conv_bn=True, fc_bn=True):
        super().__init__()
        self.features = _conv_stack(in_channels, plan, input_size, bn=conv_bn)
        feats = _flat_features(self.features, in_channels, input_size)
        self.fc = _fc_stack(feats, fc_widths, bn=fc_bn)
        self.classifier = make_head(fc_widths[-1] if fc_widths else feats, head, num_classes, dropout)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(self.fc(torch.flatten(self.features(x), 1)))


@register_model("mlp", classifier="classifier", description="seeds/000 SimpleNeuralNetwork: input -> hidden -> output")
def mlp(num_classes, in_channels, input_size, head=(), dropout=0.0, hidden: int = 128):
    return MLP(num_classes, in_channels, input_size, head, dropout, hidden=hidden)


@register_model("lenet", classifier="fc3", description="seeds/004 PyTorch CIFAR-10 tutorial Net")
def lenet(num_classes, in_channels, input_size, head=(), dropout=0.0):
    return LeNet(num_classes, in_channels, input_size, head, dropout)


@register_model("simple_cnn", classifier="classifier", description="seeds/001 own CNN: 2 conv + 2 max-pool + ReLU")
def simple_cnn(num_classes, in_channels, input_size, head=(), dropout=0.0):
    return PlanCNN(num_classes, in_channels, input_size, head, dropout,
                   plan=[32, "M", 64, "M"], fc_widths=[128], conv_bn=False, fc_bn=False)


# seeds/003 CIFAR-100 family: (conv plan, FC widths, BN in FC layers). Each conv is conv3x3+BN+ReLU.
_CIFAR_CNN_FAMILY = {
    "cifar_cnn_base": ([16, "M", 32, "M"], [256, 128], False, "2 conv blocks, fc-fc-fc (39 % on CIFAR-100)"),
    "cifar_cnn_m1": ([16, "M", 32, "M", 32, "M"], [256, 128], False, "base + conv32 block (41 %)"),
    "cifar_cnn_m2": ([16, "M", 32, "M", 64, "M"], [256, 128], False, "third block with 64 channels (44 %)"),
    "cifar_cnn_m3": ([32, 32, "M", 64, 64, "M", 128, 128, "M"], [512, 256, 128], True,
                     "recommended: 6 conv + BN, 3 FC + BN, fc4 (51 %)"),
    "cifar_cnn_m4": ([32, 32, "M", 64, 64, "M", 128, 128, "M"], [512, 256, 128], False,
                     "model 3 without BN in the FC layers (41 %)"),
    "cifar_cnn_m5": ([32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M"], [512, 256, 128], True,
                     "eight conv layers (51 %)"),
}


def _register_cifar_cnn(name, plan, fc_widths, fc_bn, description):
    @register_model(name, classifier="classifier", description=f"seeds/003 {description}")
    def builder(num_classes, in_channels, input_size, head=(), dropout=0.0):
        return PlanCNN(num_classes, in_channels, input_size, head, dropout,
                       plan=plan, fc_widths=fc_widths, conv_bn=True, fc_bn=fc_bn)
    return builder


for _name, (_plan, _widths, _fc_bn, _desc) in _CIFAR_CNN_FAMILY.items():
    _register_cifar_cnn(_name, _plan, _widths, _fc_bn, _desc)


class GapCNN(nn.Module):
    """Convs -> global average pool -> one linear layer: the head class-activation maps need
    (docs/explain.md). ``features`` and ``pool`` are separate modules so export can read the maps."""

    def __init__(self, num_classes, in_channels, input_size, head, dropout, *, plan):
        super().__init__()
        self.features = _conv_stack(in_channels, plan, input_size, bn=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_head([s for s in plan if s != "M"][-1], head, num_classes, dropout)

    def forward(self, x):  # (B, C, H, W) -> (B, num_classes)
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("gap_cnn", classifier="classifier",
                description="3 conv + BN, global average pool, linear: explainable with CAM (make serve's default)")
def gap_cnn(num_classes, in_channels, input_size, head=(), dropout=0.0):
    return GapCNN(num_classes, in_channels, input_size, head, dropout, plan=[32, "M", 64, "M", 128])
