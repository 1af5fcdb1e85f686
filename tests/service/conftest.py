"""Session fixtures: the digits bundle, and real ``bentoml serve`` processes on free loopback ports,
started and stopped by ``service.launcher`` (the repository's one launcher)."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.launcher import start_service


@pytest.fixture(scope="session")
def checkpoint(trained_digits_run) -> Path:
    return trained_digits_run / "best.pt"


@pytest.fixture(scope="session")
def bundle(digits_bundle) -> Path:
    """FP32 + INT8 (export's gate passed) bundle of the digits model."""
    return digits_bundle


MAIN_ENV = {"IMGSERVE_MAX_BODY_BYTES": "3000000", "IMGSERVE_MAX_PIXELS": "4000000", "IMGSERVE_MAX_IMAGES": "16"}


@pytest.fixture(scope="session")
def server(bundle, tmp_path_factory):
    """The default configuration (eager batcher), two names for the same bundle."""
    tmp = tmp_path_factory.mktemp("svc-main")
    env = {"IMGSERVE_MODELS": f"{bundle},second={bundle}", **MAIN_ENV}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def strict_server(bundle, tmp_path_factory):
    """API key, BentoML's own batcher and at most 4 images in flight: for 401, 503 and the cork path."""
    tmp = tmp_path_factory.mktemp("svc-strict")
    env = {"IMGSERVE_MODELS": str(bundle), "IMGSERVE_API_KEY": "s3cret-key", "IMGSERVE_BATCHER": "bentoml",
           "IMGSERVE_MAX_QUEUE": "4", **MAIN_ENV}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()
