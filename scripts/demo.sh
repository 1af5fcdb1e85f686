#!/usr/bin/env bash
# The README's first command after set-up: train the default model on real data, export, serve.
# Idempotent: an existing checkpoint is reused and an up-to-date bundle is not re-exported
# (FORCE=1 redoes both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/default}
BUNDLE=${BUNDLE:-bundles/default}
FORCE=${FORCE:-0}

if [ "$FORCE" = 1 ] || [ ! -f "$RUN/best.pt" ]; then
  echo "[demo] training the default model (simple_cnn on Fashion-MNIST, 2 epochs) into $RUN"
  $PY -m training --model simple_cnn --dataset fashion-mnist --epochs 2 --out "$RUN"
else
  echo "[demo] reusing $RUN/best.pt (FORCE=1 retrains)"
fi
echo "[demo] checkpoint: $RUN/best.pt  report: $RUN/metrics.json and $RUN/*.png"

if [ "$FORCE" = 1 ] || [ ! -f "$BUNDLE/manifest.json" ] || [ "$RUN/best.pt" -nt "$BUNDLE/manifest.json" ]; then
  echo "[demo] exporting $RUN/best.pt to the bundle $BUNDLE (and the BentoML model store, for bentoml build)"
  $PY -m export "$RUN/best.pt" --out "$BUNDLE" --force --bentoml
else
  echo "[demo] reusing the bundle $BUNDLE (newer than the checkpoint)"
fi

# SERVE=0: stop here (what `make image` needs: the bundle in the BentoML model store).
[ "${SERVE:-1}" = 1 ] || exit 0
echo "[demo] serving $BUNDLE on http://127.0.0.1:3000 (Swagger UI at /; Ctrl+C stops)"
echo "[demo]   curl -F image=@photo.png http://127.0.0.1:3000/classify"
export IMGSERVE_MODELS=${IMGSERVE_MODELS:-$BUNDLE} BENTOML_DO_NOT_TRACK=${BENTOML_DO_NOT_TRACK:-true}
exec .venv/bin/bentoml serve service.service:ImgServe --host 127.0.0.1 --port "${PORT:-3000}"
