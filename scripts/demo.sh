#!/usr/bin/env bash
# The README's first command after set-up: train the default model on real data, export, serve.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${RUN:-runs/default}
echo "[demo] training the default model into $RUN"
$PY -m training --model simple_cnn --dataset fashion-mnist --epochs 2 --out "$RUN"
echo "[demo] checkpoint: $RUN/best.pt  report: $RUN/metrics.json and $RUN/*.png"
