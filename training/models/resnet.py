"""ResNets: a hand-built ResNet-18 (seeds/000) and torchvision's ResNet-18..152 (seeds/001, 002).

Both use torchvision's module names (conv1, bn1, layer1..4, fc) so state_dicts are interchangeable.
For inputs <= 64 px the stem is a 3x3 stride-1 conv without max-pool (the CIFAR-style stem);
otherwise the ImageNet stem (7x7 stride 2 + max-pool). ``small_stem`` overrides the automatic choice.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from training.models.registry import make_head, register_model

SMALL_STEM_MAX_INPUT = 64


def _use_small_stem(input_size: int, small_stem: bool | None) -> bool:
    return input_size <= SMALL_STEM_MAX_INPUT if small_stem is None else bool(small_stem)


def _stem_conv(in_channels: int, small: bool) -> nn.Conv2d:
    if small:
        return nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip connection; a 1x1 conv projects the skip when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Scratch(nn.Module):
    """ResNet-18 written out by hand (seeds/000): stem, 4 stages of 2 basic blocks, avgpool, fc."""

    def __init__(self, num_classes, in_channels, input_size, head, dropout, small_stem=None):
        super().__init__()
        small = _use_small_stem(input_size, small_stem)
        self.conv1 = _stem_conv(in_channels, small)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(64, 64, stride=1)      # (B, 64, H/4, W/4) with the ImageNet stem
        self.layer2 = self._stage(64, 128, stride=2)
        self.layer3 = self._stage(128, 256, stride=2)
        self.layer4 = self._stage(256, 512, stride=2)    # (B, 512, H/32, W/32)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = make_head(512, head, num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet18_scratch", classifier="fc", description="seeds/000 hand-built ResNet-18")
def resnet18_scratch(num_classes, in_channels, input_size, head=(), dropout=0.0, small_stem=None):
    return ResNet18Scratch(num_classes, in_channels, input_size, head, dropout, small_stem=small_stem)


def _torchvision_resnet(arch: str, num_classes, in_channels, input_size, head, dropout, small_stem=None):
    model = getattr(torchvision.models, arch)(weights=None)
    small = _use_small_stem(input_size, small_stem)
    if small or in_channels != 3:
        model.conv1 = _stem_conv(in_channels, small)
    if small:
        model.maxpool = nn.Identity()
    model.fc = make_head(model.fc.in_features, head, num_classes, dropout)
    return model


def _register_torchvision_resnet(arch: str):
    @register_model(arch, classifier="fc", description=f"torchvision {arch} (ImageNet weights via --pretrained)")
    def builder(num_classes, in_channels, input_size, head=(), dropout=0.0, small_stem=None):
        return _torchvision_resnet(arch, num_classes, in_channels, input_size, head, dropout, small_stem)
    return builder


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    _register_torchvision_resnet(_arch)
