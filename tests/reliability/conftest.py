"""Fixtures for the reliability tests (helpers in rel_server.py): the digits bundle, and one shared
`bentoml serve` with an API key and small limits for bad inputs, fuzz, access, overload and crash."""
from __future__ import annotations

from pathlib import Path

import pytest

from rel_server import server_env, start_server, stop_server


@pytest.fixture(scope="session")
def rel_bundle(trained_digits_run, tmp_path_factory) -> Path:
    """The digits CNN (trained for real in tests/conftest.py) exported with the parity gate."""
    from svc_factory import make_bundle

    return make_bundle(trained_digits_run / "best.pt", tmp_path_factory.mktemp("rel-bundle") / "digits")


@pytest.fixture(scope="session")
def api_server(rel_bundle, tmp_path_factory):
    """One `bentoml serve` for bad inputs, fuzz, access, overload and crash (which it survives)."""
    tmp = tmp_path_factory.mktemp("rel-server")
    srv = start_server(server_env(rel_bundle), tmp / "serve.log", tmp / "bentoml_home")
    yield srv
    stop_server(srv)
