"""Print bentofile.yaml's pinned serving packages as pip constraints for the development venv.

The image installs bentofile.yaml's `python.packages`; scripts/setup.sh passes this output to
`pip install -c`, so the venv the tests run in has the same serving stack. onnxruntime is left out:
the venv has onnxruntime-gpu (pyproject.toml), whose CPU provider is the same code. Standard
library only: it runs before the venv has anything installed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

LEFT_OUT = {"onnxruntime"}


def pins(bentofile: Path) -> list[str]:
    text = bentofile.read_text(encoding="utf-8")
    block = re.search(r"^python:\n(?:[ #].*\n)*?  packages:\n((?:    - .*\n|\s*#.*\n)+)", text, flags=re.M)
    if block is None:
        raise SystemExit(f"{bentofile}: no python.packages list")
    found = re.findall(r"^    - ([A-Za-z0-9_.-]+)==(\S+)\s*$", block.group(1), flags=re.M)
    return [f"{name}=={version}" for name, version in found if name.lower() not in LEFT_OUT]


if __name__ == "__main__":
    print("\n".join(pins(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "bentofile.yaml")))
