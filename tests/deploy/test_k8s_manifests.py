"""deploy/k8s: every manifest is valid Kubernetes (strict schemas of a pinned version, offline), the
overlays render the same with our renderer as with ``kubectl kustomize``, and what the manifests say
about the service (probe paths, port, IMGSERVE_* names and values) is what the service really does:
the routes come from BentoML's own app factory for service.service:ImgServe, the variable names from
what service.config.load_settings reads.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import operator_crds
from deploy.k8s_render import RenderError, merge, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.32"  # schemas bundled with kubernetes-validate (pinned in pyproject.toml)
STANDALONE = [K8S / "base" / "secret.example.yaml"]  # valid objects kept out of the kustomizations


def by_key(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def deployment(docs: list[dict]) -> dict:
    return by_key(docs)[("Deployment", "imgserve")]


def container(docs: list[dict]) -> dict:
    (c,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return c


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o.name: render(o) for o in OVERLAYS}


@pytest.fixture(scope="module")
def service_facts() -> dict:
    """Routes, port and IMGSERVE_* names of the real service (BentoML's app factory, load_settings)."""
    from _bentoml_impl.server.app import ServiceAppFactory
    from bentoml._internal.configuration.containers import BentoMLContainer

    from service.config import load_settings
    from service.service import ImgServe

    ImgServe.inject_config()
    routes = {r.path for r in ServiceAppFactory(ImgServe, is_main=True).routes}

    class Recorder(dict):
        def get(self, key, default=None):
            self.setdefault("_read", set()).add(key)
            return super().get(key, default)

    env = Recorder()
    load_settings(env)
    return {"routes": routes, "port": BentoMLContainer.http.port.get(), "env_names": env["_read"]}


def test_the_overlays_exist() -> None:
    assert {o.name for o in OVERLAYS} >= {"baked", "mounted", "inflight-hpa", "gpu", "monitoring", "canary"}, OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_rendered_manifests_are_valid_kubernetes(overlay: Path, rendered) -> None:
    import kubernetes_validate

    docs = rendered[overlay.name]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds, kinds
    for doc in docs:
        if operator_crds.is_operator_resource(doc):  # PodMonitor, PrometheusRule: not in the Kubernetes schemas
            operator_crds.validate(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay.name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("path", STANDALONE, ids=lambda p: p.name)
def test_standalone_manifests_are_valid_kubernetes(path: Path) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_typo(rendered) -> None:
    """The validator really checks: a misspelt probe field is refused."""
    import kubernetes_validate

    doc = merge(deployment(rendered["baked"]), {"spec": {"template": {"spec": {"containers": [
        {"name": "imgserve", "readinessProbe": {"httpGet": {"pathh": "/readyz"}}}]}}}})
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: the renderer is checked "
                    "by the other tests only")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_renderer_matches_kubectl_kustomize(overlay: Path, rendered) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs = by_key([d for d in yaml.safe_load_all(out.stdout) if d])
    assert by_key(rendered[overlay.name]) == theirs


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path)


def test_strategic_merge_by_key_and_replace() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}], "metrics": [1, 2]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "3"}]}],
             "metrics": [9]}
    assert merge(base, patch) == {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"},
                                                                      {"name": "X", "value": "3"}]}], "metrics": [9]}


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_probes_and_ports_are_the_services_own(overlay: Path, rendered, service_facts) -> None:
    docs = rendered[overlay.name]
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    grpc = int(next(e["value"] for e in c["env"] if e["name"] == "IMGSERVE_GRPC_PORT"))
    assert ports == {"http": service_facts["port"], "grpc": grpc}, \
        f"the service listens on {service_facts['port']} and gRPC on {grpc}: {ports}"
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, get in probes.items():
        assert get["path"] in service_facts["routes"], f"{name} {get['path']} is not a route of the service"
        assert get["port"] in ports, f"{name} uses port {get['port']!r}, not a named container port"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/livez"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "warm-up of a big model needs minutes"
    ann = deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == service_facts["port"]
    assert ann["prometheus.io/path"] in service_facts["routes"]
    svc = by_key(docs)[("Service", "imgserve")]
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    (g,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    assert g["targetPort"] == "grpc" and g["appProtocol"] == "grpc", g  # HTTP/2 to the pods, for meshes/gateways


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_env_names_and_values_are_what_the_service_reads(overlay: Path, rendered, service_facts) -> None:
    from service.config import load_settings

    docs = rendered[overlay.name]
    c = container(docs)
    cm = by_key(docs)[("ConfigMap", "imgserve-config")]
    assert c["envFrom"] == [{"configMapRef": {"name": "imgserve-config"}}]
    names = set(cm["data"]) | {e["name"] for e in c["env"]}
    unknown = {n for n in names if n.startswith("IMGSERVE_")} - service_facts["env_names"]
    assert not unknown, f"the service never reads {sorted(unknown)}"
    assert {"IMGSERVE_MODELS", "IMGSERVE_THREADS", "IMGSERVE_API_KEY"} <= names
    # The values parse as the service parses them (the API key and the thread count come from the cluster).
    literal = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    load_settings({**cm["data"], **literal, "IMGSERVE_THREADS": "2", "IMGSERVE_API_KEY": "k"})


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_threads_follow_the_cpu_limit_and_the_key_comes_from_the_secret(overlay: Path, rendered) -> None:
    c = container(rendered[overlay.name])
    env = {e["name"]: e for e in c["env"]}
    ref = env["IMGSERVE_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": c["name"], "resource": "limits.cpu", "divisor": "1"}
    cpu = c["resources"]["limits"]["cpu"]
    assert str(cpu).isdigit() and int(cpu) >= 1, f"a whole number of CPUs, so the thread count is exact: {cpu}"
    assert c["resources"]["requests"] == c["resources"]["limits"], "Guaranteed QoS"
    (secret,) = yaml.safe_load_all((K8S / "base" / "secret.example.yaml").read_text())
    key_ref = env["IMGSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key_ref["name"] == secret["metadata"]["name"] and key_ref["key"] in secret["stringData"]
    assert not key_ref.get("optional"), "without the Secret the pods must not start open"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_pods_are_non_root_read_only_and_drain_before_stopping(overlay: Path, rendered) -> None:
    docs = rendered[overlay.name]
    dep = deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    home = next(e["value"] for e in c["env"] if e["name"] == "BENTOML_HOME")
    assert "/tmp" in writable and any(home.startswith(w.rstrip("/") + "/") for w in writable), (home, writable)
    vols = {v["name"]: v for v in pod["volumes"]}
    assert all(m["name"] in vols for m in c["volumeMounts"])
    # SIGTERM only after the preStop pause, and BentoML gets the whole request timeout to finish.
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "/bin/sleep"
    cm = by_key(docs)[("ConfigMap", "imgserve-config")]["data"]
    assert pod["terminationGracePeriodSeconds"] > int(pre[1]) + int(cm["IMGSERVE_TIMEOUT_S"])
    roll = dep["spec"]["strategy"]["rollingUpdate"]
    assert roll["maxUnavailable"] == 0 and roll["maxSurge"] >= 1, "a roll never lowers the ready count"
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_selectors_and_references_line_up(overlay: Path, rendered) -> None:
    docs = by_key(rendered[overlay.name])
    dep = docs[("Deployment", "imgserve")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs[("Service", "imgserve")]["spec"]["selector"].items() <= labels.items()
    assert docs[("PodDisruptionBudget", "imgserve")]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = docs[("HorizontalPodAutoscaler", "imgserve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imgserve"}
    assert hpa["minReplicas"] >= 2, "one replica is no failover"
    pdb = docs[("PodDisruptionBudget", "imgserve")]["spec"]
    assert pdb.get("maxUnavailable", 0) < hpa["minReplicas"]


def test_mounted_overlay_serves_a_bundle_from_the_read_only_volume(rendered) -> None:
    docs = rendered["mounted"]
    c = container(docs)
    models = next(e["value"] for e in c["env"] if e["name"] == "IMGSERVE_MODELS")
    mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True and models.startswith(mount["mountPath"].rstrip("/") + "/")
    vol = next(v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in by_key(docs)


def test_baked_overlay_serves_the_model_store_of_the_image(rendered) -> None:
    from service.config import parse_models

    c = container(rendered["baked"])
    (src,) = parse_models(next(e["value"] for e in c["env"] if e["name"] == "IMGSERVE_MODELS"))
    assert src.store, "the baked image serves from its BentoML model store"
    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert any(m.split(":")[0] == src.location.split(":")[0] for m in bentofile["models"]), \
        f"{src.location} is not among the models bentofile.yaml packs: {bentofile['models']}"


def test_inflight_hpa_uses_the_metric_the_adapter_rule_exposes(rendered) -> None:
    hpa = by_key(rendered["inflight-hpa"])[("HorizontalPodAutoscaler", "imgserve")]["spec"]
    (metric,) = hpa["metrics"]
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    assert metric["pods"]["metric"]["name"] in {r["name"]["as"] for r in rules}
    # The same Deployment as the baked overlay, only the HPA differs.
    assert deployment(rendered["inflight-hpa"]) == deployment(rendered["baked"])


def test_gpu_overlay_asks_for_one_gpu_and_is_otherwise_the_inflight_one(rendered) -> None:
    gpu, cpu = deployment(rendered["gpu"]), deployment(rendered["inflight-hpa"])
    c = container(rendered["gpu"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-gpu"), c["image"]
    assert by_key(rendered["gpu"])[("ConfigMap", "imgserve-config")]["data"]["IMGSERVE_DEVICE"] == "cuda"
    assert "IMGSERVE_DEVICE" not in {e["name"] for e in c["env"]}, "podman kube play lets envFrom win over env"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["spec"]["template"]["spec"]["tolerations"])
    assert by_key(rendered["gpu"])[("HorizontalPodAutoscaler", "imgserve")] == \
        by_key(rendered["inflight-hpa"])[("HorizontalPodAutoscaler", "imgserve")], "scaled on requests in flight"
    # Nothing else differs from the inflight-hpa overlay's Deployment.
    strip = lambda d: {**d, "spec": {**d["spec"], "template": {**d["spec"]["template"], "spec": {
        k: v for k, v in d["spec"]["template"]["spec"].items() if k not in ("tolerations", "containers")}}}}
    assert strip(gpu) == strip(cpu)


def test_canary_overlay_serves_two_versions_by_the_mounted_policy(rendered) -> None:
    """Both versions on the read-only model volume under one name; IMGSERVE_TRAFFIC is a file of
    the policy ConfigMap, mounted as a folder (a subPath mount never sees an update), and the
    policy in it is one the service accepts for exactly those versions."""
    from service.config import parse_models
    from service.traffic import parse_text

    docs = rendered["canary"]
    c = container(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    sources = parse_models(env["IMGSERVE_MODELS"])
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert len(sources) >= 2 and len({s.name for s in sources}) == 1, sources
    assert len({s.version for s in sources}) == len(sources) and all(s.version for s in sources)
    assert all(s.location.startswith(mounts["models"]["mountPath"] + "/") for s in sources), sources
    folder, _, key = env["IMGSERVE_TRAFFIC"].rpartition("/")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == folder)
    assert mount["readOnly"] is True and "subPath" not in mount, mount
    vol = next(v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    cm = by_key(docs)[("ConfigMap", vol["configMap"]["name"])]
    policies = parse_text(cm["data"][key], {sources[0].name: {s.version for s in sources}})
    weights = dict(policies[sources[0].name].weights)
    assert 0 < weights["v2"] < 100, f"a canary sends some, not all, traffic to the new version: {weights}"
    # Nothing else differs from the mounted overlay's Deployment: same pods, two versions, one policy.
    strip = lambda d: {**d, "spec": {**d["spec"], "template": {**d["spec"]["template"], "spec": {
        k: v for k, v in d["spec"]["template"]["spec"].items() if k not in ("volumes", "containers")}}}}
    assert strip(deployment(docs)) == strip(deployment(rendered["mounted"]))
    assert {k: v for k, v in c.items() if k not in ("env", "volumeMounts")} == \
        {k: v for k, v in container(rendered["mounted"]).items() if k not in ("env", "volumeMounts")}
