"""Write the Kubernetes PrometheusRule from deploy/monitoring/rules.yml, so both carry the same groups.

    python -m deploy.monitoring.k8s      # rewrites deploy/k8s/overlays/monitoring/prometheusrule.yaml

Edit rules.yml, never the PrometheusRule: tests/deploy/test_monitoring_manifests.py fails while they differ.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from deploy.monitoring.local import RULES

PROMETHEUS_RULE = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "monitoring" / "prometheusrule.yaml"
HEADER = ("# Generated from deploy/monitoring/rules.yml by `python -m deploy.monitoring.k8s`: edit that file,\n"
          "# not this one. The Prometheus Operator loads these groups into every Prometheus whose\n"
          "# ruleSelector matches the labels.\n")


def prometheus_rule() -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "imgserve", "labels": {"app.kubernetes.io/name": "imgserve", "role": "alert-rules"}},
        "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]},
    }


def main() -> None:
    PROMETHEUS_RULE.write_text(HEADER + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=10_000))
    print(PROMETHEUS_RULE)


if __name__ == "__main__":
    main()
