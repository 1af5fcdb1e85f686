#!/usr/bin/env bash
# `make serve` and `make bench`: train a model, export it behind the parity gate, then serve it
# (or benchmark it). Idempotent: an existing checkpoint is reused and an up-to-date bundle is not
# re-exported (FORCE=1 redoes both).
#
#   scripts/serve.sh [serve|build|bench|image]
#
# Without DATA: gap_cnn on Fashion-MNIST (2 epochs) -> runs/default, bundles/default (gap_cnn ends in
# global average pooling + a linear layer, so POST /explain serves its class-activation maps: docs/explain.md).
# DATA=DIR (one subfolder of images per class; train/val/test subfolders are used when present):
#   MODEL (default resnet18) trained EPOCHS (default 10) epochs in batches of BATCH (default 32:
#   a folder of a few hundred images still gets several steps per epoch) at SIZE px (default: 224
#   for ResNets, the images' typical size for the small models) -> runs/NAME, bundles/NAME where
#   NAME = folder-model. TRAIN_ARGS: more flags for `python -m training` (e.g. --pretrained imagenet).
# PORT (3000) for serve; BENCH_ARGS: more flags for `python -m loadtests.bench`.
# image (`make image`): the serving image with that bundle baked in (FLAVOUR cpu|gpu, BASE auto|stock|
#   local; docs/container.md), named imgserve, or imgserve-NAME with DATA; prints the `podman run` line.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-serve}
PY=${PY:-.venv/bin/python}
BENTOML=$(dirname "$PY")/bentoml
DATA=${DATA:-}
FORCE=${FORCE:-0}
log() { echo "[serve] $*"; }

case "$MODE" in serve|build|bench|image) ;; *) echo "usage: $0 [serve|build|bench|image]" >&2; exit 2 ;; esac

if [ -z "$DATA" ]; then
  MODEL=${MODEL:-gap_cnn}
  NAME=${NAME:-default}
  train=(--model "$MODEL" --dataset fashion-mnist --epochs "${EPOCHS:-2}")
  export_extra=(--bentoml)   # the default model also goes to the BentoML store, for `bentoml build`
else
  [ -d "$DATA" ] || { echo "[serve] DATA=$DATA is not a folder (want DATA/CLASS/*.jpg|png...)" >&2; exit 2; }
  MODEL=${MODEL:-resnet18}
  # A model name BentoML accepts: lower-case letters, digits, '-', '_' and '.'
  NAME=${NAME:-$(basename "$(realpath "$DATA")" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9._\n-' '-')-$MODEL}
  case "$MODEL" in resnet*) SIZE=${SIZE:-224} ;; esac
  train=(--model "$MODEL" --dataset folder --data-dir "$DATA" --epochs "${EPOCHS:-10}" --batch-size "${BATCH:-32}"
         ${SIZE:+--image-size "$SIZE"})
  export_extra=()
fi
RUN=${RUN:-runs/$NAME}
BUNDLE=${BUNDLE:-bundles/$NAME}

if [ "$FORCE" = 1 ] || [ ! -f "$RUN/best.pt" ]; then
  log "training: python -m training ${train[*]} ${TRAIN_ARGS:-} --out $RUN"
  # shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
  "$PY" -m training "${train[@]}" ${TRAIN_ARGS:-} --out "$RUN"
else
  log "reusing $RUN/best.pt (FORCE=1 retrains)"
fi
log "checkpoint: $RUN/best.pt  report: $RUN/metrics.json and $RUN/*.png"

if [ "$FORCE" = 1 ] || [ ! -f "$BUNDLE/manifest.json" ] || [ "$RUN/best.pt" -nt "$BUNDLE/manifest.json" ]; then
  log "exporting $RUN/best.pt to $BUNDLE (ONNX + TorchScript, parity gate)"
  "$PY" -m export "$RUN/best.pt" --out "$BUNDLE" --name "$NAME" --force ${export_extra[@]+"${export_extra[@]}"}
else
  log "reusing the bundle $BUNDLE (newer than the checkpoint)"
fi

case "$MODE" in
  build) exit 0 ;;
  image)
    IMAGE_NAME=${IMAGE_NAME:-imgserve${DATA:+-$NAME}}
    log "image $IMAGE_NAME from $BUNDLE: python -m container build --flavour ${FLAVOUR:-cpu} --base ${BASE:-auto}"
    exec "$PY" -m container build --flavour "${FLAVOUR:-cpu}" --base "${BASE:-auto}" --bundle "$BUNDLE" \
      --name "$IMAGE_NAME" ;;
  bench)
    log "benchmarking $BUNDLE: python -m loadtests.bench --bundle $BUNDLE ${BENCH_ARGS:-}"
    # shellcheck disable=SC2086
    exec "$PY" -m loadtests.bench --bundle "$BUNDLE" ${BENCH_ARGS:-} ;;
esac

URL="http://127.0.0.1:${PORT:-3000}"
log "serving $BUNDLE on $URL (Ctrl+C stops)"
log "  demo page:  $URL/demo"
log "  API:        curl -F image=@photo.jpg $URL/classify    (all routes: $URL/docs)"
export IMGSERVE_MODELS=${IMGSERVE_MODELS:-$BUNDLE} BENTOML_DO_NOT_TRACK=${BENTOML_DO_NOT_TRACK:-true}
exec "$BENTOML" serve service.service:ImgServe --host 127.0.0.1 --port "${PORT:-3000}"
