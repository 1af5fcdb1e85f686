"""Names and versions of the two file formats, and the valid values of their policies."""
from __future__ import annotations

import re

BUNDLE_FORMAT = "imgserve.bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

CHECKPOINT_FORMAT = "imgserve.checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Model names and versions: safe as a path component and as a BentoML tag part.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

COLOR_MODES = {"L": 1, "RGB": 3}  # PIL mode -> channels
RESIZE_POLICIES = ("stretch", "shorter_side_center_crop")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
PRECISIONS = ("fp32", "int8", "fp16")
FILE_KINDS = ("onnx", "torchscript")
