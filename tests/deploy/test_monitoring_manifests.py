"""deploy/k8s/overlays/monitoring: the PrometheusRule carries exactly the groups of
deploy/monitoring/rules.yml (one truth), the PodMonitor scrapes what the Deployment serves and gives
the job label the rules select, and both are valid Prometheus Operator resources (strict)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

import operator_crds
from deploy.k8s_render import render
from deploy.monitoring.k8s import PROMETHEUS_RULE, prometheus_rule
from deploy.monitoring.local import RULES

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "monitoring"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in render(OVERLAY)}


def test_the_prometheus_rule_is_rules_yml(docs) -> None:
    assert yaml.safe_load(PROMETHEUS_RULE.read_text()) == prometheus_rule(), (
        "prometheusrule.yaml differs from deploy/monitoring/rules.yml: run python -m deploy.monitoring.k8s")
    assert docs["PrometheusRule"]["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_operator_resources_are_valid_and_typos_are_caught(docs) -> None:
    for kind in ("PodMonitor", "PrometheusRule"):
        operator_crds.validate(docs[kind])
    typo = copy.deepcopy(docs["PodMonitor"])
    typo["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(operator_crds.InvalidResource, match="intervall"):
        operator_crds.validate(typo)


def test_the_pod_monitor_scrapes_what_the_pods_serve(docs) -> None:
    dep = docs["Deployment"]
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    spec = docs["PodMonitor"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for p in c["ports"]}
    # the same path and port the Deployment announces (test_k8s_manifests checks those are the service's)
    assert endpoint["path"] == pod["metadata"]["annotations"]["prometheus.io/path"]


def test_the_rules_select_the_pod_monitors_job() -> None:
    """The Operator names the job <namespace>/<PodMonitor name>; the rules' `up` selectors must match it."""
    name = yaml.safe_load((OVERLAY / "podmonitor.yaml").read_text())["metadata"]["name"]
    selectors = set(re.findall(r'up\{job=~"([^"]+)"\}', RULES.read_text()))
    assert selectors, "no up{job=~...} selector in the rules"
    for rx in selectors:
        assert re.fullmatch(rx, f"production/{name}") and re.fullmatch(rx, "imgserve"), rx


def test_the_overlay_deploys_the_baked_model_unchanged(docs) -> None:
    baked = {d["kind"]: d for d in render(OVERLAY.parent / "baked")}
    assert {k: v for k, v in docs.items() if k not in ("PodMonitor", "PrometheusRule")} == baked
