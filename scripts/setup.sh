#!/usr/bin/env bash
# Idempotent set-up: system packages (apt), a Python 3.11 venv in .venv, torch pinned, the project.
# Re-running skips what is already done (the venv stamp is the hash of pyproject.toml and bentofile.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[setup] $*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else echo "[setup] need root for: $* (run it yourself, then re-run)" >&2; return 1; fi
}

# System packages: Fashion-MNIST (the default demo data), wrk (the benchmark's load generator), haproxy.
need_apt=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
# h2load (nghttp2): the gRPC load generator of loadtests.oip_bench (HTTP/2, as wrk is for HTTP/1.1).
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
# HAProxy: the load balancer of the local replicas (make replicas, tests/deploy).
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# Chromium and its WebDriver: the demo page's browser tests (headless, tests/demo).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
# Container images (make image, tests/container): podman with runc (crun fails on cgroup-v1 hosts),
# debootstrap for the local Debian base where no public image registry is reachable.
# podman is installed whatever else is there: a docker CLI is often present without a daemon, and
# the local replicas (deploy/replicas) run on podman. After the install, the engine is checked below.
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need_apt+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
# Prometheus and promtool: the alert rules' unit tests and the end-to-end alert test (deploy/monitoring).
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# kubectl kustomize renders deploy/k8s for tests/container/test_kube_play.py (podman kube play).
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubectl)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  as_root apt-get update -qq || true
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" \
    || log "WARNING: could not install ${need_apt[*]}; Fashion-MNIST demos and wrk benchmarks will say so"
fi

# The image tests use the engine that works (docker when its daemon answers, else podman: what
# container.engines.get_engine("auto") picks); say now if none does, not in the middle of the tests.
engine=$(scripts/container_engine.sh)
if [ -n "$engine" ]; then log "container engine: $engine ($engine info answers)"
else log "WARNING: no container engine works ('docker info' and 'podman info' both fail): tests/container and tests/deploy will fail"; fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "[setup] Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

[ -x .venv/bin/python ] || { log "creating .venv"; "$PYTHON" -m venv .venv; }
stamp=.venv/.imgserve-stamp
want=$(cat pyproject.toml bentofile.yaml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "venv up to date"
else
  log "installing torch==2.14.1 torchvision==0.29.1 and the project (first time: several minutes)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  # The serving stack at the image's versions (bentofile.yaml is its lock; scripts/serving_pins.py).
  .venv/bin/python scripts/serving_pins.py > .venv/serving-constraints.txt
  .venv/bin/pip install -q -c .venv/serving-constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi

# KServe's own gRPC client, unchanged, in a venv of its own (its protobuf and psutil pins clash with
# the serving stack's): tests/service/test_grpc_kserve_client.py drives the service with it.
if [ -f .venv-kserve/.imgserve-stamp ] && cmp -s tests/clients/kserve.txt .venv-kserve/.imgserve-stamp; then
  log "KServe client venv up to date"
else
  log "installing KServe's Python client into .venv-kserve"
  [ -x .venv-kserve/bin/python ] || "$PYTHON" -m venv .venv-kserve
  .venv-kserve/bin/pip install -q -r tests/clients/kserve.txt && cp tests/clients/kserve.txt .venv-kserve/.imgserve-stamp
fi
