#!/usr/bin/env bash
# The serving image against the same service run as a process: same bundle, same payload, same wrk
# settings (loadtests.bench --server-cmd ... --url ...), alternating process / container ROUNDS times
# so that both see the same machine. Prints each run's best 2xx req/s and the ratio of the bests.
#   scripts/bench_container.sh BUNDLE [IMAGE]     (IMAGE default localhost/imgserve:cpu, from `make image`)
# Env: ROUNDS (2), DURATION (15s), CONCURRENCY (1,8,32,64), IMAGE_OPT (extra run options).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=$(realpath "$1"); IMAGE=${2:-localhost/imgserve:cpu}
ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-15s}; CONCURRENCY=${CONCURRENCY:-1,8,32,64}
PY=${PY:-.venv/bin/python}; BENTOML=$(dirname "$PY")/bentoml
ENGINE=${ENGINE:-podman}
# podman on hosts where its defaults fail (see container/engines.py); written by `make image`.
[ -n "${CONTAINERS_CONF:-}" ] || [ ! -f build/container/containers.conf ] || export CONTAINERS_CONF=$PWD/build/container/containers.conf
name=$(basename "$BUNDLE"); out=loadtests/results/container-vs-process-$(date +%Y%m%d-%H%M%S)-$name
mkdir -p "$out"
port() { "$PY" -c 'from service.launcher import free_port; print(free_port())'; }
bench() {  # LABEL CMD URL
  "$PY" -m loadtests.bench --bundle "$BUNDLE" --no-inproc --no-floor --duration "$DURATION" --concurrency "$CONCURRENCY" \
    --label "$1" --server-cmd "$2" --url "$3" --out "$out/$1" > "$out/$1.log" 2>&1 || { tail -20 "$out/$1.log"; exit 1; }
  "$PY" - "$out/$1/bench.json" "$1" <<'PY' | tee -a "$out/summary.txt"
import json, sys
r = json.load(open(sys.argv[1]))
best = max(r["served"], key=lambda s: s["ok_rps"])
each = ", ".join("c=%d: %.1f" % (s["concurrency"], s["ok_rps"]) for s in r["served"])
print("%-12s best %7.1f 2xx req/s at c=%d (%s; load %.1f->%.1f)" % (sys.argv[2], best["ok_rps"], best["concurrency"],
      each, r["loadavg_start"][0], r["loadavg_end"][0]))
PY
}
echo "bundle $BUNDLE, image $IMAGE ($("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-12)), $(uptime)" | tee "$out/summary.txt"
for r in $(seq "$ROUNDS"); do
  p=$(port)
  bench "process-$r" "env IMGSERVE_MODELS=$BUNDLE BENTOML_DO_NOT_TRACK=true $BENTOML serve service.service:ImgServe --host 127.0.0.1 --port $p" "http://127.0.0.1:$p/classify"
  p=$(port)
  bench "container-$r" "$ENGINE run --rm --network=host --read-only --tmpfs /tmp -e BENTOML_HOST=127.0.0.1 -e BENTOML_PORT=$p -e IMGSERVE_MODELS=/models/$name -v $BUNDLE:/models/$name:ro ${IMAGE_OPT:-} $IMAGE" "http://127.0.0.1:$p/classify"
done
"$PY" - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, pathlib, sys
best = {}
for f in pathlib.Path(sys.argv[1]).glob("*/bench.json"):
    side = f.parent.name.split("-")[0]
    best[side] = max(best.get(side, 0.0), max(s["ok_rps"] for s in json.loads(f.read_text())["served"]))
print(f"best 2xx req/s: process {best['process']:.1f}, container {best['container']:.1f}, "
      f"container/process {best['container'] / best['process']:.3f}")
PY
echo "$(uptime)" | tee -a "$out/summary.txt"; echo "results: $out"
