"""bento -> serving image, the BentoML way: `bentoml build` then `bentoml containerize`.

    build_image(BuildOptions(flavour="cpu"))   # what `make image` runs

Steps: pick the engine; put the bundle to bake in into the BentoML model store; `bentoml build` with
the flavour's bentofile; choose the base image (the bentofile's stock one when it can be pulled,
else the local Debian base, made once by container/base.sh); `bentoml containerize` with the base
as a build argument. One build at a time per host (a lock file): image builds use every core.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from container.engines import Engine, get_engine
from container.flavours import Flavour, flavour_bentofile, get_flavour

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "container"
BENTOFILE = ROOT / "bentofile.yaml"
LOCAL_BASE = "localhost/imgserve-base:bookworm"
BUILD_LOCK = Path("/tmp/imgserve-podman.lock")
BENTOML = Path(sys.executable).with_name("bentoml")


@dataclass
class BuildOptions:
    flavour: str = "cpu"
    base: str = "auto"  # auto, stock (the bentofile's), local (container/base.sh)
    engine: str = "auto"
    bundle: Path | None = None  # imported into the model store first (else the store's model is used)
    name: str = "imgserve"  # image name; tags are FLAVOUR and BENTOVERSION-FLAVOUR


@dataclass
class Built:
    image: str  # NAME:BENTOVERSION-FLAVOUR
    alias: str  # NAME:FLAVOUR, moved to the newest build
    bento: str
    flavour: str
    engine: str
    base: str
    size_bytes: int
    containerize_s: float


def build_image(opts: BuildOptions) -> Built:
    flavour = get_flavour(opts.flavour)
    engine = get_engine(opts.engine, WORK)
    bentofile = flavour_bentofile(flavour, BENTOFILE, WORK)
    if opts.bundle is not None:
        import_bundle(opts.bundle, served_model(bentofile))
    bento = bentoml_build(bentofile, flavour)
    version = bento.split(":", 1)[1]
    image, alias = f"{opts.name}:{version}-{flavour.name}", f"{opts.name}:{flavour.name}"
    with open(BUILD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one image build at a time on this host
        base = resolve_base(opts.base, engine, flavour, stock_base(bento))
        took = containerize(engine, bento, [image, alias], base, WORK / f"containerize-{flavour.name}.log")
    return Built(image, alias, bento, flavour.name, engine.name, base, engine.image_size(image), took)


def served_model(bentofile: Path) -> str:
    """The model name the bentofile bakes in (its first `models:` entry, e.g. `default`)."""
    models = yaml.safe_load(bentofile.read_text()).get("models") or []
    if not models:
        raise SystemExit(f"{bentofile} lists no model to bake into the image")
    first = models[0] if isinstance(models[0], str) else models[0]["tag"]
    return first.split(":", 1)[0]


def import_bundle(bundle: Path, name: str) -> str:
    """Put `bundle` into the BentoML model store under the name the bento bakes in (`default`), as the
    newest entry (the bentofile asks for `default:latest`). The manifest keeps the model's own name,
    which is the name the image serves it under: a bundle from any folder needs no renaming."""
    from imgformat.store import import_to_bentoml

    return import_to_bentoml(bundle, replace=True, name=name)


def bentoml_build(bentofile: Path, flavour: Flavour) -> str:
    out = subprocess.run([str(BENTOML), "build", "-f", str(bentofile.relative_to(ROOT)), "-o", "tag",
                          "--label", f"flavour={flavour.name}", "."], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    tags = re.findall(r"__tag__:(\S+)", out.stdout)
    if out.returncode != 0 or not tags:
        raise SystemExit(f"bentoml build failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    log.info("bento %s (%s flavour)", tags[-1], flavour.name)
    return tags[-1]


def bento_dir(bento: str) -> Path:
    import bentoml

    return Path(bentoml.bentos.get(bento).path)


def stock_base(bento: str) -> str:
    """The base image BentoML chose for this bento (its Dockerfile's BASE_IMAGE default)."""
    dockerfile = (bento_dir(bento) / "env" / "docker" / "Dockerfile").read_text()
    m = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M)
    if not m:
        raise SystemExit(f"{bento}'s Dockerfile has no BASE_IMAGE argument: is docker.dockerfile_template "
                         "container/Dockerfile.j2?")
    return m.group(1)


def resolve_base(choice: str, engine: Engine, flavour: Flavour, stock: str) -> str:
    """`auto`: the stock base when it is here or can be pulled, else the local Debian base."""
    if choice not in ("auto", "stock", "local"):
        raise SystemExit(f"unknown base {choice!r}; valid: auto, stock, local")
    if choice == "stock" or (choice == "auto" and (engine.image_exists(stock) or _pull(engine, stock))):
        return stock
    if not flavour.local_base:
        raise SystemExit(f"the {flavour.name} flavour needs its stock base {stock}, which cannot be pulled here "
                         f"(no local substitute: it carries CUDA and cuDNN); build it where a registry is reachable")
    if not engine.image_exists(LOCAL_BASE):
        log.info("%s cannot be pulled: making the local base %s (debootstrap, about 1-4 min, once)", stock, LOCAL_BASE)
        subprocess.run([str(ROOT / "container" / "base.sh"), LOCAL_BASE], check=True,
                       env={**os.environ, **engine.env, "ENGINE": engine.name})
    return LOCAL_BASE


def _pull(engine: Engine, image: str) -> bool:
    try:
        return engine.run("pull", "-q", image, check=False, timeout=900).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def containerize(engine: Engine, bento: str, tags: list[str], base: str, logfile: Path) -> float:
    cmd = [str(BENTOML), "containerize", bento, "--backend", engine.name, "--opt", "network=host",
           "--opt", f"build-arg=BASE_IMAGE={base}"]
    for opt in engine.build_opts:
        cmd += ["--opt", opt]
    for tag in tags:
        cmd += ["-t", tag]
    log.info("bentoml containerize %s on %s (log: %s)", bento, base, logfile)
    t0 = time.perf_counter()
    with open(logfile, "w") as fh:
        # cwd=/: BentoML 1.4.39 refuses a dockerfile_template outside the working directory, and
        # containerize re-renders it from a temporary copy of the bento under /tmp.
        rc = subprocess.run(cmd, cwd="/", stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, **engine.env, "BENTOML_DO_NOT_TRACK": "true"}).returncode
    took = time.perf_counter() - t0
    if rc != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"bentoml containerize failed ({rc}) after {took:.0f} s; last lines of {logfile}:\n{tail}")
    return took
