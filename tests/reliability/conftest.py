"""Fixtures for the reliability tests (helpers in rel_server.py): the digits bundle, and one shared
`bentoml serve` with an API key and small limits for bad inputs, fuzz, access, overload and crash."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.launcher import start_service
from rel_server import API_KEY, server_env


@pytest.fixture(scope="session")
def rel_bundle(digits_bundle) -> Path:
    """The digits CNN (trained for real in tests/conftest.py) exported with the parity gate."""
    return digits_bundle


@pytest.fixture(scope="session")
def api_server(rel_bundle, tmp_path_factory):
    """One `bentoml serve` for bad inputs, fuzz, access, overload and crash (which it survives)."""
    tmp = tmp_path_factory.mktemp("rel-server")
    srv = start_service(server_env(rel_bundle), tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def wide_server(rel_bundle, tmp_path_factory):
    """The service's default limits (a 20 MB body), an API key, and model control through the API
    under a model root: for hostile requests, bounded metrics and default-deny access."""
    tmp = tmp_path_factory.mktemp("wide-server")
    env = {"IMGSERVE_MODELS": str(rel_bundle), "IMGSERVE_API_KEY": API_KEY, "IMGSERVE_MODEL_CONTROL": "explicit",
           "IMGSERVE_MODEL_ROOT": str(rel_bundle.parent)}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    srv.stop()
