#!/usr/bin/env bash
# The GPU check (docs/container.md#the-gpu-check), for a host with one GPU: under 8 minutes, one report.
#   scripts/gpu_check.sh [IMAGE]     IMAGE: serve through the GPU image (e.g. localhost/imgserve:gpu)
#                                    instead of `bentoml serve` in this venv
# Needs, in .venv: onnxruntime-gpu[cuda,cudnn]==1.26.0 in place of onnxruntime (the GPU image's pins);
# on the host: an NVIDIA driver >= 525 (CUDA 12), nvidia-smi, wrk; for IMAGE, podman with CDI or docker.
# Makes bundles/default (scripts/serve.sh build) if missing, exports it again with --fp16 into
# build/gpu-check/bundle (the FP16 gate then runs on the GPU), then runs python -m loadtests.gpu_check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-build/gpu-check}
[ -f runs/default/best.pt ] || ./scripts/serve.sh build
mkdir -p "$OUT"
"$PY" -m export runs/default/best.pt --out "$OUT/bundle" --name default --fp16 --force > "$OUT/export.log" 2>&1 \
  || { tail -30 "$OUT/export.log"; exit 1; }
args=(--bundle "$OUT/bundle" --out "$OUT")
if [ -n "${1:-}" ]; then
  engine=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
  args+=(--image "$1" --engine "$engine")
fi
exec "$PY" -m loadtests.gpu_check "${args[@]}"
