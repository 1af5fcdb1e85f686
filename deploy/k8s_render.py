"""Render a kustomization of deploy/k8s without kubectl: the subset of Kustomize these manifests use.

    python -m deploy.k8s_render deploy/k8s/overlays/mounted > mounted.yaml

Supported: ``resources`` (files and kustomization directories), ``images`` (newName/newTag) and
``patches`` given by ``path`` (strategic-merge patches, matched by kind and name). Anything else in
a kustomization.yaml is refused, so a manifest cannot silently use a feature this renderer ignores.
tests/deploy checks the result against ``kubectl kustomize`` where kubectl is installed.

Strategic merge here follows the Kubernetes API's patch strategy for the fields these manifests
patch: lists of containers, env, volumes, ports and volume mounts merge by their key; any other
list is replaced whole (as for HPA ``metrics``, which has no merge key); maps merge recursively.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

# patchMergeKey of the list fields these manifests patch (from the Kubernetes API definitions).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
SUPPORTED = {"apiVersion", "kind", "resources", "images", "patches"}


class RenderError(ValueError):
    """A kustomization this renderer cannot render faithfully; the message says what and where."""


def merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """Strategic merge of ``patch`` onto ``base`` (both plain YAML values); returns a new value."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    key = MERGE_KEYS.get(field or "")
    if key and isinstance(base, list) and isinstance(patch, list):
        out = copy.deepcopy(base)
        new = []
        for item in patch:
            at = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if at is None:
                new.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item)
        return new + out  # kustomize puts items only the patch has first
    return copy.deepcopy(patch)


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _set_images(doc: dict, images: list[dict]) -> None:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        name, _, tag = c["image"].partition(":")
        for im in images:
            if im["name"] == name:
                c["image"] = f"{im.get('newName', name)}:{im.get('newTag', tag or 'latest')}"


def render(directory: Path) -> list[dict]:
    """The resources of the kustomization in ``directory``, patched, as a list of dicts."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise RenderError(f"{kfile}: fields {sorted(unknown)} are not supported here (only {sorted(SUPPORTED)}); "
                          "render with `kubectl kustomize` or keep to the supported subset")
    docs: list[dict] = []
    for res in kust.get("resources", []):
        p = (directory / res).resolve()
        docs += render(p) if p.is_dir() else _load_docs(p)
    for patch in kust.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{kfile}: only `patches: - path: FILE` is supported, got {patch}")
        for pdoc in _load_docs(directory / patch["path"]):
            at = [i for i, d in enumerate(docs) if (d["kind"], d["metadata"]["name"]) ==
                  (pdoc["kind"], pdoc["metadata"]["name"])]
            if len(at) != 1:
                raise RenderError(f"{directory / patch['path']}: patch for {pdoc['kind']}/{pdoc['metadata']['name']} "
                                  f"matches {len(at)} resources")
            docs[at[0]] = merge(docs[at[0]], pdoc)
    for doc in docs:
        _set_images(doc, kust.get("images", []))
    return docs


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(render(Path(args[0])), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
