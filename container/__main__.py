"""`python -m container build [--flavour cpu|gpu] [--base auto|stock|local] [--engine auto|podman|docker]`.

Builds the serving image from the bento (bentoml build + bentoml containerize) and prints its name,
base and size. `python -m container base` only makes the local Debian base image.
"""
from __future__ import annotations

import argparse
import json
import os
import logging
import subprocess
from dataclasses import asdict
from pathlib import Path

from container.build import LOCAL_BASE, ROOT, WORK, BuildOptions, build_image
from container.engines import get_engine, list_engines
from container.flavours import list_flavours


# How each engine hands the GPUs to a container (podman: CDI, `nvidia-ctk cdi generate` on the host).
GPU_ARGS = {"docker": "--gpus all", "podman": "--device nvidia.com/gpu=all"}


def run_line(engine: str, flavour: str, image: str) -> str:
    """The command that serves the image on 127.0.0.1:3000, read-only (BENTOML_HOME is on the /tmp tmpfs)."""
    gpu = f"{GPU_ARGS[engine]} " if flavour == "gpu" else ""
    return f"{engine} run -d {gpu}-p 127.0.0.1:3000:3000 --read-only --tmpfs /tmp {image}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m container", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="bento -> image")
    b.add_argument("--flavour", default="cpu", choices=list_flavours(), help="cpu (default) or gpu")
    b.add_argument("--base", default="auto", choices=("auto", "stock", "local"),
                   help="stock: the bentofile's base (python:3.11-slim, nvidia/cuda); local: the Debian base "
                        "made by container/base.sh; auto (default): stock when it can be pulled, else local")
    b.add_argument("--engine", default="auto", choices=("auto", *list_engines()),
                   help="auto (default): docker when its daemon answers, else podman")
    b.add_argument("--bundle", type=Path, default=None,
                   help="bundle to bake in (imported into the BentoML model store first; its name must be the "
                        "bentofile's model, `default`); default: the store's `default:latest`")
    b.add_argument("--name", default="imgserve", help="image name (tags FLAVOUR and BENTOVERSION-FLAVOUR)")
    b.add_argument("--report", type=Path, default=None, help="also write the result (image, size, ...) as JSON here")
    s = sub.add_parser("base", help=f"make the local Debian base image {LOCAL_BASE}")
    s.add_argument("--engine", default="auto", choices=("auto", *list_engines()))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[image] %(message)s")

    if a.cmd == "base":
        engine = get_engine(a.engine, WORK)
        subprocess.run([str(ROOT / "container" / "base.sh"), LOCAL_BASE], check=True,
                       env={**os.environ, **engine.env, "ENGINE": engine.name})
        return 0
    built = build_image(BuildOptions(a.flavour, a.base, a.engine, a.bundle, a.name))
    if a.report:
        a.report.write_text(json.dumps(asdict(built), indent=2))
    print(f"[image] {built.image} (also {built.alias}): {built.size_bytes / 1e6:.0f} MB, {built.flavour} flavour, "
          f"base {built.base}, engine {built.engine}, containerize {built.containerize_s:.0f} s")
    print(f"[image] run: {run_line(built.engine, built.flavour, built.alias)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
