"""deploy/kserve: the InferenceServices point KServe at what the service really serves: OIP health
routes of service/oip.py for their probes, BentoML's port, IMGSERVE_* names and values that
service.config.load_settings reads and accepts. canary.yaml is KServe's own canary: Serverless mode
(the only one where KServe splits traffic between revisions), a canaryTrafficPercent strictly between
0 and 100, and otherwise the same pod as inferenceservice.yaml but for its gRPC port (Knative allows
one port per container). (KServe's CRD schema is not bundled offline, so the objects are checked
field by field rather than against a schema.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

KSERVE = Path(__file__).resolve().parents[2] / "deploy" / "kserve"
MANIFESTS = sorted(KSERVE.glob("*.yaml"))
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _container(path: Path) -> tuple[dict, dict]:
    (isvc,) = list(yaml.safe_load_all(path.read_text()))
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    (c,) = isvc["spec"]["predictor"]["containers"]
    return isvc, c


def test_both_manifests_are_here() -> None:
    assert {p.name for p in MANIFESTS} >= {"inferenceservice.yaml", "canary.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_probes_and_port_are_the_services_own(path: Path) -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    from service import oip

    isvc, c = _container(path)
    assert c["name"] == "kserve-container", "KServe takes the custom predictor from a container of this name"
    assert c["ports"][0]["containerPort"] == BentoMLContainer.http.port.get()
    paths = {r.path for r in oip.routes}
    probes = [p for p in PROBES if p in c]
    assert {"readinessProbe", "livenessProbe"} <= set(probes), probes
    for probe in probes:
        get = c[probe]["httpGet"]
        assert get["path"] in paths and get["path"].startswith("/v2/health/"), (probe, get)
        assert get["port"] == c["ports"][0]["containerPort"]
    # gRPC: the port named h2c (how KServe/Knative recognise HTTP/2 cleartext) is the one the service binds.
    env = {e["name"]: e.get("value") for e in c["env"]}
    h2c = [p["containerPort"] for p in c["ports"] if p["name"] == "h2c"]
    if serverless(isvc):  # Knative allows one port per container: HTTP here
        assert len(c["ports"]) == 1 and not h2c and "IMGSERVE_GRPC_PORT" not in env, c["ports"]
    else:
        assert h2c == [int(env["IMGSERVE_GRPC_PORT"])]


def serverless(isvc: dict) -> bool:
    return isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode") == "Serverless"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_env_is_what_the_service_reads(path: Path) -> None:
    from service.config import load_settings

    isvc, c = _container(path)
    read: set[str] = set()

    class Recorder(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

    literal = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    settings = load_settings(Recorder({**literal, "IMGSERVE_THREADS": "2", "IMGSERVE_API_KEY": "k"}))
    assert {e["name"] for e in c["env"]} <= read
    assert settings.model_control == "none"  # repository changes stay off in the deployed manifest
    assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > settings.timeout_s


def test_canary_splits_revisions_in_serverless_mode() -> None:
    canary, c = _container(KSERVE / "canary.yaml")
    plain, p = _container(KSERVE / "inferenceservice.yaml")
    assert canary["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless", \
        "KServe's canaryTrafficPercent works in Serverless mode only"
    pct = canary["spec"]["predictor"]["canaryTrafficPercent"]
    assert isinstance(pct, int) and 0 < pct < 100, pct
    assert canary["spec"]["predictor"]["minReplicas"] >= 1, "scale to zero would add the warm-up to a request"
    # The same pod as the plain InferenceService: image (another tag), env, resources, security, mounts.
    assert c["image"].split(":")[0] == p["image"].split(":")[0] and c["image"] != p["image"]
    same = ("resources", "securityContext", "volumeMounts")
    assert {k: c[k] for k in same} == {k: p[k] for k in same}
    assert c["ports"] == p["ports"][:1], "the HTTP port (Knative: one port per container, so no gRPC port)"
    assert c["env"] == [e for e in p["env"] if e["name"] != "IMGSERVE_GRPC_PORT"]
    assert canary["spec"]["predictor"]["volumes"] == plain["spec"]["predictor"]["volumes"]
    live = c["livenessProbe"]
    startup = p["startupProbe"]
    assert live.get("initialDelaySeconds", 0) >= startup["periodSeconds"] * startup["failureThreshold"] / 2, \
        "without a startup probe, liveness waits for the model's warm-up"
