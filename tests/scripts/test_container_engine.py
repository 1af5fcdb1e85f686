"""scripts/container_engine.sh names an engine only when it works: a docker CLI without a daemon
(the fresh-machine case that broke `make test`) is not an engine. Driven with stand-in CLIs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "container_engine.sh"


def _bin(tmp_path: Path, **engines: int) -> Path:
    """A PATH holding only ``timeout`` and a stand-in for each engine whose `info` exits with the given status."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "timeout").symlink_to(shutil.which("timeout"))
    for name, status in engines.items():
        (d / name).write_text(f"#!/bin/sh\n[ \"$1\" = info ] && exit {status}\nexit 0\n")
        (d / name).chmod(0o755)
    return d


@pytest.mark.parametrize("engines, want", [
    ({"docker": 1}, ""),                     # a docker CLI, no daemon, no podman: setup installs podman
    ({"docker": 1, "podman": 0}, "podman"),  # the same machine after setup
    ({"docker": 0, "podman": 0}, "docker"),  # a running Docker daemon is used first
    ({"docker": 0}, "docker"),
    ({"podman": 1}, ""),                     # podman that cannot run: no engine, setup warns
    ({}, ""),                                # neither: setup installs podman
])
def test_only_an_engine_that_answers_counts(tmp_path, engines, want) -> None:
    out = subprocess.run(["/bin/bash", str(SCRIPT)], env={"PATH": str(_bin(tmp_path, **engines))},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == want, (out.stdout, out.stderr)


def test_setup_installs_podman_without_asking_docker() -> None:
    """The rule that failed on a fresh machine: podman was skipped whenever a docker CLI existed."""
    setup = (SCRIPT.parent / "setup.sh").read_text()
    assert "command -v podman >/dev/null 2>&1 || need_apt+=(podman)" in setup
    assert "command -v docker >/dev/null 2>&1 || need_apt+=(podman)" not in setup
