"""The Kubernetes manifests as `podman kube play` runs them: render a kustomization with `kubectl
kustomize`, make the few test-only changes that keep the pod on the loopback and out of other
helpers' way, play it, and take it down again.

Test-only changes (nothing else of the rendered manifests is touched):
- every name gets a unique suffix (podman's pods, ConfigMaps and secrets live in one shared
  namespace per host), and references to renamed objects follow;
- the image is the one built by the tests;
- `hostNetwork: true` and BENTOML_HOST=127.0.0.1 / BENTOML_PORT=<free port>, and the same for gRPC
  (IMGSERVE_GRPC_HOST / IMGSERVE_GRPC_PORT) (podman kube play has no --publish; the servers would
  otherwise bind 0.0.0.0 and the fixed 8001); podman turns a declared container port into a
  port mapping, which host networking refuses, so `ports:` goes and the probes' named port `http`
  becomes that number;
- a PersistentVolumeClaim becomes a podman volume the test fills (kube play cannot provision one).
"""
from __future__ import annotations

import base64
import copy
import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from container.engines import Engine
from service.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def kustomizations() -> list[str]:
    """The base and every overlay on disk (new overlays are played without editing this test)."""
    overlays = sorted(p.parent.relative_to(K8S).as_posix() for p in (K8S / "overlays").glob("*/kustomization.yaml"))
    return ["base", *overlays]


def render(kustomization: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: apt-get install kubectl (scripts/setup.sh does)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {kustomization}: {out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@dataclass
class Played:
    """What one `podman kube play` made: the played file, the original Deployments, the pods' ports."""
    engine: Engine
    name: str  # the kustomization (base, overlays/baked, ...)
    docs: list[dict]  # as rendered
    file: Path
    deployments: dict[str, dict]  # played Deployment name -> the Deployment as rendered
    ports: dict[str, int]  # played Deployment name -> its server's 127.0.0.1 port
    secrets: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    def url(self, deployment: str) -> str:
        return f"http://127.0.0.1:{self.ports[deployment]}"

    def pods(self, deployment: str) -> list[str]:
        """The pods podman made for a Deployment (named DEPLOYMENT-pod, or DEPLOYMENT-pod-0 by podman 4.3)."""
        out = self.engine.run("pod", "ps", "--format", "{{.Name}}").stdout.split()
        return [p for p in out if p == f"{deployment}-pod" or p.startswith(f"{deployment}-pod-")]

    def container(self, deployment: str, name: str) -> str:
        """The ID of container `name` of the Deployment's pod (podman names it POD-NAME)."""
        pods = self.pods(deployment)
        assert len(pods) == 1, f"{deployment}: pods {pods}"
        out = self.engine.run("ps", "-a", "--filter", f"pod={pods[0]}", "--format", "{{.ID}} {{.Names}}").stdout
        ids = [ln.split()[0] for ln in out.splitlines() if ln.split()[1] == f"{pods[0]}-{name}"]
        assert ids, f"no container {name} in pod {pods[0]}:\n{out}"
        return ids[0]

    def down(self) -> subprocess.CompletedProcess:
        out = self.engine.run("kube", "down", str(self.file), check=False, timeout=180)
        for s in self.secrets:
            self.engine.run("secret", "rm", s, check=False)
        for v in self.volumes:
            self.engine.run("volume", "rm", "-f", v, check=False)
        return out


def prepare(docs: list[dict], *, image: str, suffix: str, secrets: dict[str, dict[str, str]]) -> tuple[list[dict], dict]:
    """The test-only changes (module docstring). `secrets`: Secret name -> {key: value}, created in
    podman under the suffixed name. Returns the documents to play and {pod: (deployment, port)}."""
    names = {d["kind"]: set() for d in docs}
    for d in docs:
        names[d["kind"]].add(d["metadata"]["name"])
    renamed = {n: f"{n}-{suffix}" for kind in ("ConfigMap", "Deployment", "PersistentVolumeClaim")
               for n in names.get(kind, ())} | {n: f"{n}-{suffix}" for n in secrets}
    out, pods = [], {}
    for d in docs:
        if d["kind"] not in ("ConfigMap", "Deployment"):
            continue  # Service, HPA, PDB, PVC, ...: nothing kube play runs (PVCs become volumes below)
        d = copy.deepcopy(d)
        original = copy.deepcopy(d)
        d["metadata"]["name"] = renamed[d["metadata"]["name"]]
        if d["kind"] == "Deployment":
            port = free_port()
            _localise(d["spec"]["template"]["spec"], image, port, renamed)
            pods[d["metadata"]["name"]] = (original, port)
        out.append(d)
    return out, pods


def _localise(spec: dict, image: str, port: int, renamed: dict[str, str]) -> None:
    spec["hostNetwork"] = True
    for c in spec["containers"]:
        c["image"] = image
        c["imagePullPolicy"] = "Never"
        # gRPC too: on a free loopback port, not the manifest's fixed 8001 on every interface.
        local = {"BENTOML_HOST": "127.0.0.1", "BENTOML_PORT": str(port), "IMGSERVE_GRPC_HOST": "127.0.0.1",
                 "IMGSERVE_GRPC_PORT": str(free_port({port}))}
        c["env"] = [e for e in c.get("env", []) if e["name"] not in local] + [
            {"name": k, "value": v} for k, v in local.items()]
        named = {p["name"]: port for p in c.pop("ports", []) if p.get("name")}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = (c.get(probe) or {}).get("httpGet")
            if get and get.get("port") in named:
                get["port"] = named[get["port"]]
        for e in c["env"]:
            for ref in ("secretKeyRef", "configMapKeyRef"):
                r = (e.get("valueFrom") or {}).get(ref)
                if r and r["name"] in renamed:
                    r["name"] = renamed[r["name"]]
        for src in c.get("envFrom", []):
            for ref in ("configMapRef", "secretRef"):
                if ref in src and src[ref]["name"] in renamed:
                    src[ref]["name"] = renamed[src[ref]["name"]]
    for v in spec.get("volumes", []):
        claim = v.get("persistentVolumeClaim")
        if claim:
            claim["claimName"] = renamed[claim["claimName"]]
        if "configMap" in v and v["configMap"]["name"] in renamed:
            v["configMap"]["name"] = renamed[v["configMap"]["name"]]


def podman_secret(engine: Engine, name: str, data: dict[str, str]) -> None:
    """A podman secret as `podman kube play` reads a secretKeyRef: a JSON map key -> base64 value."""
    payload = json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in data.items()})
    engine.run("secret", "create", name, "-", input=payload)


def filled_volume(engine: Engine, name: str, files: dict[str, Path]) -> None:
    """A podman volume (what kube play mounts for a PersistentVolumeClaim) holding `files` (dest -> source dir)."""
    engine.run("volume", "create", name)
    mountpoint = Path(engine.run("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
    for dest, src in files.items():
        shutil.copytree(src, mountpoint / dest)
        subprocess.run(["chmod", "-R", "a+rX", str(mountpoint / dest)], check=True)


def play(engine: Engine, name: str, rendered: list[dict], docs: list[dict], pods: dict, tmp: Path,
         secrets: list[str], volumes: list[str]) -> Played:
    """`podman kube play` of `docs` (`rendered` after prepare())."""
    file = tmp / "played.yaml"
    file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    played = Played(engine, name, rendered, file, {p: d for p, (d, _) in pods.items()}, {p: port for p, (_, port) in pods.items()},
                    secrets, volumes)
    out = engine.run("kube", "play", str(file), check=False, timeout=300)
    if out.returncode != 0:
        played.down()
        raise AssertionError(f"podman kube play failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return played
