"""Fuzzing (issue 21 item 6): one real server for schemathesis, bounded in time; the parser fuzz runs in-process."""
from __future__ import annotations

import pytest

from service.launcher import start_service

FUZZ_KEY = "fuzz-key"


@pytest.fixture(scope="module")
def fuzz_server(digits_bundle, tmp_path_factory):
    """Default limits, the key set, the model repository on with an empty model root: loads of any path
    the fuzzer invents must be refused, never read."""
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "models").mkdir()
    env = {"IMGSERVE_MODELS": str(digits_bundle), "IMGSERVE_API_KEY": FUZZ_KEY, "IMGSERVE_MODEL_CONTROL": "explicit",
           "IMGSERVE_MODEL_ROOT": str(tmp / "models")}
    srv = start_service(env, tmp / "serve.log", tmp / "bentoml_home")
    srv.api_key = FUZZ_KEY
    yield srv
    srv.stop()
