"""deploy/kserve: the InferenceService points KServe at what the service really serves: OIP health
routes of service/oip.py for its probes, BentoML's port, IMGSERVE_* names and values that
service.config.load_settings reads and accepts. (KServe's CRD schema is not bundled offline, so the
object is checked field by field rather than against a schema.)"""
from __future__ import annotations

from pathlib import Path

import yaml

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kserve" / "inferenceservice.yaml"


def _container() -> tuple[dict, dict]:
    (isvc,) = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    (c,) = isvc["spec"]["predictor"]["containers"]
    return isvc, c


def test_probes_and_port_are_the_services_own() -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    from service import oip

    _, c = _container()
    assert c["name"] == "kserve-container", "KServe takes the custom predictor from a container of this name"
    assert c["ports"][0]["containerPort"] == BentoMLContainer.http.port.get()
    paths = {r.path for r in oip.routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in paths and get["path"].startswith("/v2/health/"), (probe, get)
        assert get["port"] == c["ports"][0]["containerPort"]
    # gRPC: the port named h2c (how KServe/Knative recognise HTTP/2 cleartext) is the one the service binds.
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert [p["containerPort"] for p in c["ports"] if p["name"] == "h2c"] == [int(env["IMGSERVE_GRPC_PORT"])]


def test_env_is_what_the_service_reads() -> None:
    from service.config import load_settings

    isvc, c = _container()
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
