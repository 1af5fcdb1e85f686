"""schemathesis against a real server: the service's own OpenAPI document (/docs.json) and the Open
Inference Protocol description (docs/openapi/oip.yaml). No 5xx, no answer slower than the bound, and
the server answers its probes afterwards. Each run is capped in time (``--max-time``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
MAX_RESPONSE_S = 5  # far above any answer here (ms), far below a stall
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))


def schemathesis(server, location: str, seconds: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [SCHEMATHESIS, "run", location, "--url", server.url, "-H", f"Authorization: Bearer {server.api_key}",
           "--checks", "not_a_server_error", "--max-response-time", str(MAX_RESPONSE_S), "--max-examples", "25",
           "--seed", "1", "--generation-database", "none", "--no-color", "--max-time", str(seconds), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, cwd=ROOT)


def _alive(server) -> None:
    assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    assert server.proc.poll() is None


def test_the_service_openapi_document(fuzz_server) -> None:
    out = schemathesis(fuzz_server, fuzz_server.url + "/docs.json", 30)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "passed" in out.stdout and "Server error" not in out.stdout
    _alive(fuzz_server)


def test_the_open_inference_protocol(fuzz_server) -> None:
    # Unloading the one model would make readiness 503 on purpose; every other repository call is fuzzed.
    out = schemathesis(fuzz_server, str(ROOT / "docs" / "openapi" / "oip.yaml"), 40,
                       "--exclude-operation-id", "repository-unload")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Server error" not in out.stdout
    _alive(fuzz_server)
