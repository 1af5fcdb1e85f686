"""Pods from the Kubernetes manifests: the base and every overlay rendered by `kubectl kustomize`,
played by `podman kube play` against the image built by the tests (kube.py lists the test-only
changes: unique names, loopback port, the test image, a podman volume for a PVC).

Checked for every Deployment: the pod runs as the manifest's non-root user on a read-only root with
only /tmp writable; the ConfigMap's values and the Secret's key reach the server (a request without
the key is refused, with it answered); a ConfigMap mounted as a folder arrives file by file, and a
traffic policy among them (IMGSERVE_TRAFFIC, the canary overlay) is the one the pod serves by; the
probes' paths answer 200; a classification equals the same bundle served as a process (by one of the
versions the policy routes to); `podman kube down` leaves no pod, container, secret or listener.

What kube play cannot show, and where it is covered instead: the HorizontalPodAutoscaler, the
PodDisruptionBudget, the Service's endpoints and the rolling update (maxSurge 1 / maxUnavailable 0,
minReadySeconds) need a Kubernetes control plane; tests/deploy/test_k8s_manifests.py validates them
against the Kubernetes schemas and checks their values, tests/deploy/test_replicas.py runs N replicas
behind a load balancer with a one-at-a-time replacement under load, and tests/container/test_image.py
checks SIGTERM under load (what the preStop + grace period rely on).
"""
from __future__ import annotations

import time
import uuid

import httpx
import pytest
import yaml

from ctr_run import classify, inputs
from kube import filled_volume, kustomizations, play, podman_secret, prepare, render
from service.launcher import http_status

API_KEY = "kube-play-test-key"
READY_TIMEOUT_S = 240


@pytest.fixture(params=kustomizations())
def played(request, engine, cpu_image, digits_bundle, tmp_path):
    if engine.name != "podman":
        pytest.skip("podman kube play is podman's")
    suffix = f"t{uuid.uuid4().hex[:8]}"
    docs = render(request.param)
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for d in docs if d["kind"] == "Deployment"
                   for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
                   if "secretKeyRef" in (e.get("valueFrom") or {})}
    to_play, pods = prepare(docs, image=cpu_image["alias"], suffix=suffix, secrets={s: {} for s in secret_refs})
    secrets, volumes = [], []
    for name in secret_refs:
        podman_secret(engine, f"{name}-{suffix}", {"api-key": API_KEY})
        secrets.append(f"{name}-{suffix}")
    for d in docs:
        if d["kind"] == "PersistentVolumeClaim":  # the model volume, holding every bundle IMGSERVE_MODELS names
            volume = f"{d['metadata']['name']}-{suffix}"
            filled_volume(engine, volume, {folder: digits_bundle for folder in model_dirs(docs)})
            volumes.append(volume)
    p = play(engine, request.param, docs, to_play, pods, tmp_path, secrets, volumes)
    yield p
    p.down()


def model_dirs(docs: list[dict]) -> list[str]:
    """The folders under the volume that the Deployment's IMGSERVE_MODELS names, one per entry
    (/models/digits-v1 -> digits-v1; digits@v1=/models/digits-v1,digits@v2=/models/digits-v2 -> both)."""
    from service.config import parse_models

    found = []
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                for e in c.get("env", []):
                    if e["name"] == "IMGSERVE_MODELS":
                        found += [src.location[len(m) + 1:] for src in parse_models(e["value"]) for m in mounts
                                  if src.location.startswith(m + "/")]
    assert found, "a PersistentVolumeClaim but no IMGSERVE_MODELS under its mount"
    return found


def wait_ready(url: str, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if http_status(url + path, timeout=3) == 200:
            return
        time.sleep(1)
    raise AssertionError(f"{url}{path} not 200 after {READY_TIMEOUT_S} s")


def probe_paths(container: dict) -> dict[str, str]:
    return {kind: container[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if kind in container}


def test_pods_from_the_manifests_serve_as_the_manifests_say(played, engine, process) -> None:
    assert played.deployments, f"{played.name} renders no Deployment"
    pods = {d: played.pods(d) for d in played.deployments}
    for dep, deployment in played.deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        container = spec["containers"][0]
        url = played.url(dep)
        paths = probe_paths(container)
        assert paths, f"{played.name}: no HTTP probes"
        wait_ready(url, paths.get("startupProbe") or paths["readinessProbe"])
        for kind, path in paths.items():
            assert http_status(url + path, timeout=5) == 200, f"{played.name} {kind} {path}"
        cid = played.container(dep, container["name"])
        _runs_as_declared(engine, cid, spec, container, played.name)
        _config_and_secret_arrive(engine, cid, deployment, played.docs, url, played.name)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        served = httpx.get(url + "/models", headers=headers, timeout=10).json()["models"][0]
        limit = container["resources"]["limits"]["cpu"]
        assert served["intra_op_threads"] <= int(limit), (served, limit)
        versions = _policy_arrives(engine, cid, deployment, played.docs, url, headers, played.name)
        for what, upload in inputs().items():
            got = classify(url, upload, headers=headers)
            want = classify(process.url, upload, model=served["name"])
            assert got.status_code == want.status_code == 200, (played.name, what, got.text, want.text)
            if versions:  # several versions of the same bundle: the answer is the process's, by one of them
                assert got.json()["version"] == got.headers["x-model-version"] in versions, (got.json(), versions)
                assert {**got.json(), "version": None} == {**want.json(), "version": None}, (got.json(), want.json())
                continue
            assert got.json() == want.json(), f"{played.name} {what}: pod {got.json()} != process {want.json()}"
    out = played.down()
    assert out.returncode == 0, out.stderr
    for deployment, its_pods in pods.items():
        assert its_pods and not played.pods(deployment), f"{deployment}: pods {played.pods(deployment)} are left"
        for pod in its_pods:
            left = engine.run("ps", "-a", "--filter", f"pod={pod}", "--format", "{{.ID}}").stdout.strip()
            assert not left, f"containers of {pod} are left: {left}"
        assert http_status(played.url(deployment) + "/livez", timeout=2) == 0, "the server still listens"
    for s in played.secrets:
        assert engine.run("secret", "inspect", s, check=False).returncode != 0, f"secret {s} is left"


def _runs_as_declared(engine, cid: str, spec: dict, container: dict, name: str) -> None:
    uid = str(spec["securityContext"]["runAsUser"])
    status = engine.run("exec", cid, "cat", "/proc/1/status").stdout.splitlines()
    uids = [ln.split()[1:] for ln in status if ln.startswith("Uid:")]
    assert uids == [[uid] * 4], f"{name}: PID 1 runs as {uids}, the manifest says {uid}"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for path in ("/x", "/app/x", "/home/bentoml/bento/x"):
        assert engine.run("exec", cid, "touch", path, check=False).returncode != 0, f"{name}: {path} is writable"
    assert engine.run("exec", cid, "touch", "/tmp/x", check=False).returncode == 0, f"{name}: /tmp is not writable"


def _config_and_secret_arrive(engine, cid: str, deployment: dict, docs: list[dict], url: str, name: str) -> None:
    env = dict(ln.split("=", 1) for ln in engine.run("exec", cid, "env").stdout.splitlines() if "=" in ln)
    configmap = {d["name"] for c in deployment["spec"]["template"]["spec"]["containers"]
                 for d in (s.get("configMapRef") for s in c.get("envFrom", [])) if d}
    assert configmap, f"{name}: the Deployment reads no ConfigMap"
    explicit = {e["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    both = explicit & set(configmap_values(docs, deployment))
    assert not both, f"{name}: {both} set in the ConfigMap and as env: podman kube play lets envFrom win, Kubernetes env"
    for key, value in configmap_values(docs, deployment).items():
        assert env.get(key) == str(value), f"{name}: {key}={env.get(key)!r}, the ConfigMap says {value!r}"
    limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert env.get("IMGSERVE_THREADS") == str(limit), f"{name}: IMGSERVE_THREADS={env.get('IMGSERVE_THREADS')}"
    assert env.get("IMGSERVE_API_KEY") == API_KEY, f"{name}: the Secret's key did not reach the server"
    upload = inputs()["photo"]
    assert classify(url, upload).status_code == 401, f"{name}: served without the key"


def _policy_arrives(engine, cid: str, deployment: dict, docs: list[dict], url: str, headers: dict,
                   name: str) -> set[str]:
    """Every ConfigMap mounted as a folder is there, file by file; with IMGSERVE_TRAFFIC naming one of
    those files, the pod serves by that policy (GET /models). Returns the versions it routes to."""
    spec = deployment["spec"]["template"]["spec"]
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
    container = spec["containers"][0]
    files = {f"{m['mountPath']}/{key}": text for m in container.get("volumeMounts", []) if m["name"] in volumes
             for key, text in maps[volumes[m["name"]]].items()}
    for path, text in files.items():
        assert engine.run("exec", cid, "cat", path).stdout == text, f"{name}: {path} is not the ConfigMap's"
    traffic = next((e["value"] for e in container.get("env", []) if e["name"] == "IMGSERVE_TRAFFIC"), None)
    if traffic is None:
        return set()
    assert traffic in files, f"{name}: IMGSERVE_TRAFFIC={traffic} is no file of a mounted ConfigMap"
    want = yaml.safe_load(files[traffic])
    got = httpx.get(url + "/models", headers=headers, timeout=10).json()["traffic"]
    for model, policy in want.items():
        assert got[model]["weights"] == policy["weights"], f"{name}: serving by {got[model]}, the ConfigMap says {policy}"
    return {v for policy in want.values() for v, w in policy["weights"].items() if w > 0}


def configmap_values(docs: list[dict], deployment: dict) -> dict[str, str]:
    """The values of the ConfigMaps the Deployment reads as environment (envFrom)."""
    names = {s["configMapRef"]["name"] for c in deployment["spec"]["template"]["spec"]["containers"]
             for s in c.get("envFrom", []) if "configMapRef" in s}
    return {k: v for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] in names for k, v in d["data"].items()}
