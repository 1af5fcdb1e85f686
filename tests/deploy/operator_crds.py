"""Validation of the Prometheus Operator's custom resources (PodMonitor, PrometheusRule), which the
Kubernetes schemas of kubernetes-validate do not cover: the pydantic models generated from the
Operator's CRDs (cloudcoil-models-prometheus-operator, pinned in pyproject.toml), made strict by a
round trip: a field the CRD does not define is dropped by the model, so the dump differs."""
from __future__ import annotations

API_VERSION = "monitoring.coreos.com/v1"


def _models() -> dict[str, type]:
    from cloudcoil.models.prometheus_operator import v1

    return {"PodMonitor": v1.PodMonitor, "ServiceMonitor": v1.ServiceMonitor, "PrometheusRule": v1.PrometheusRule}


def is_operator_resource(doc: dict) -> bool:
    return doc.get("apiVersion") == API_VERSION


class InvalidResource(ValueError):
    pass


def validate(doc: dict) -> None:
    """Raise InvalidResource unless ``doc`` is a valid, fully understood Operator resource."""
    model = _models().get(doc.get("kind"))
    if model is None:
        raise InvalidResource(f"{doc.get('kind')} is not a Prometheus Operator kind this check knows")
    try:
        parsed = model.model_validate(doc)
    except Exception as e:  # pydantic's ValidationError, with the path and the reason
        raise InvalidResource(str(e)) from e
    back = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if back != doc:
        raise InvalidResource(f"{doc['kind']}/{doc['metadata']['name']}: fields the CRD does not define: "
                              f"{_dropped(doc, back)}")


def _dropped(doc, back, path: str = "") -> list[str]:
    if isinstance(doc, dict) and isinstance(back, dict):
        return [p for k, v in doc.items() for p in ([f"{path}.{k}"] if k not in back else _dropped(v, back[k], f"{path}.{k}"))]
    if isinstance(doc, list) and isinstance(back, list):
        return [p for i, (a, b) in enumerate(zip(doc, back)) for p in _dropped(a, b, f"{path}[{i}]")]
    return [] if doc == back else [f"{path} ({doc!r} read as {back!r})"]
