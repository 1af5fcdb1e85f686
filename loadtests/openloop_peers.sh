#!/usr/bin/env bash
# Open-loop steps (loadtests/openloop.py) against imgserve and the peers of ../shared/bench/peers, in one run.
#
#   PEER_BUNDLE=bundles/r18 SLO_MS=1000 IMG=china.jpg loadtests/openloop_peers.sh imgserve torchserve litserve bentoml_nobatch
#   PEER_BUNDLE=bundles/m28 SLO_MS=100 IMG=digit.png ENGINE=vegeta loadtests/openloop_peers.sh imgserve torchserve ...
#
# ENGINE (python, the default, or vegeta: scripts/get_vegeta.sh) is what sends the arrivals, the same
# for every server of the run; use vegeta where the python engine's "sent req/s" falls short of the
# offered rate (a few thousand req/s on 2 cores).
#
# Use PEER_BUNDLE (the harness's bundle mode): every server, imgserve included, then serves that
# bundle's model.onnx. Without it the peers serve the harness's own ResNet ($PEERS_HOME/r18.onnx,
# made by its run_all.sh) and imgserve needs BUNDLE: not the same model.
#
# Each server is started with the harness's own start script and venv ($PEERS_HOME, made by the harness's
# setup.sh) under setsid, on the port the harness gives it, waited for (a 2xx answer), measured
# closed-loop at c=8 for its capacity, offered STEPS x capacity for SECONDS each, then stopped by its
# process group. imgserve is served from this checkout with IMGSERVE_MODELS=$PEER_BUNDLE (or $BUNDLE).
# CAPACITY (req/s) offers every server the same arrivals instead of multiples of its own closed-loop
# capacity, so servers whose c=8 capacities differ meet the same offered load. SERVER_CPUS and
# CLIENT_CPUS (taskset lists, e.g. 1 and 0) pin every server and the generator to their own cores,
# so a generator that needs a core of its own at 2x-4x of a small model's capacity does not take it
# from the server it measures.
# imgserve-haproxy is imgserve behind HAProxy (python -m deploy.replicas up -n 1 --runner process) with
# HAPROXY_MAXCONN requests in flight at the replica (default 8) and HAPROXY_QUEUE_MS in HAProxy's queue
# before its 503 (default 20), and HAPROXY_REUSE (default always: the replica keeps its connections
# from HAProxy instead of a new one per request): HAProxy answers the excess in C (docs/performance.md, "Overload").
# The rows go to $OUT/openloop.md (the harness's results.md format: paste under its tables) and
# one JSON per server; the load average is written with each row.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-/work/shared/bench/peers}; export PEERS_HOME=${PEERS_HOME:-/tmp/imgserve-peers}
SLO_MS=${SLO_MS:-1000}; ENGINE=${ENGINE:-python}; SECONDS_PER_STEP=${SECONDS_PER_STEP:-20}; STEPS=${STEPS:-0.5,0.9,1.2,2,4}
OUT=${OUT:-$(mktemp -d /tmp/openloop-peers.XXXX)}; mkdir -p "$OUT"
IMG=${IMG:?set IMG to the image every server gets}
PY=${PY:-.venv/bin/python}
# arrays, not a function: the server must be exec'ed so that $! is its process group
PIN_SERVER=(); [ -n "${SERVER_CPUS:-}" ] && PIN_SERVER=(taskset -c "$SERVER_CPUS")
PIN_CLIENT=(); [ -n "${CLIENT_CPUS:-}" ] && PIN_CLIENT=(taskset -c "$CLIENT_CPUS")

# name -> "start script|port|path|multipart field"; the same table as the harness's peer_conf.
declare -A CONF=(
  [torchserve]="torchserve/start.sh|8080|/predictions/r18|images"
  [litserve]="litserve/start.sh|8001|/predict|images"
  [rayserve]="rayserve/start.sh|8002|/predict|images"
  [bentoml_nobatch]="bentoml_nobatch/start.sh|3000|/classify|images"
  [bentoml_naive10k]="bentoml_naive/start.sh|3000|/classify|images"
)

wait_2xx() { # URL FIELD PID: up to 300 s for one 2xx answer to the image, while PID lives
  for _ in $(seq 300); do
    kill -0 "$3" 2>/dev/null || return 1
    code=$(curl -s -o /dev/null -w '%{http_code}' -F "$2=@$IMG" "$1" || true)
    [[ $code == 2* ]] && return 0; sleep 1
  done; return 1
}

stop_group() { kill -TERM -- "-$1" 2>/dev/null || true; sleep 5; kill -KILL -- "-$1" 2>/dev/null || true; }

for spec in "$@"; do  # imgserve+KEY=V+KEY2=V2: imgserve with those settings, labelled so
  name=${spec%%+*}; settings=(); [[ $spec == *+* ]] && IFS='+' read -r -a settings <<< "${spec#*+}"
  if [ "$name" = imgserve-haproxy ]; then
    port=$($PY -c 'from service.launcher import free_port; print(free_port())'); path=/classify; field=image
    work=$(mktemp -d /tmp/openloop-replicas.XXXX)  # short: HAProxy's admin socket path has a 108-byte limit
    envargs=(); for kv in "${settings[@]}"; do envargs+=(-e "$kv"); done
    "${PIN_SERVER[@]}" $PY -m deploy.replicas --workdir "$work" up -n 1 --runner process --port "$port" \
      --bundle "${PEER_BUNDLE:-${BUNDLE:?set PEER_BUNDLE or BUNDLE}}" --server-maxconn "${HAPROXY_MAXCONN:-8}" \
      --queue-timeout-ms "${HAPROXY_QUEUE_MS:-20}" --http-reuse "${HAPROXY_REUSE:-always}" "${envargs[@]}" > "$OUT/$spec.log" 2>&1 || { echo "$spec: did not start (see $OUT/$spec.log)" >&2; continue; }
    setsid sleep infinity & pid=$!  # stands for the group while it serves; the replicas and HAProxy are stopped by `down`
  elif [ "$name" = imgserve ]; then
    port=$($PY -c 'from service.launcher import free_port; print(free_port())'); path=/classify; field=image
    "${PIN_SERVER[@]}" env "${settings[@]}" IMGSERVE_MODELS=${PEER_BUNDLE:-${BUNDLE:?set PEER_BUNDLE or BUNDLE}} BENTOML_DO_NOT_TRACK=true \
      setsid .venv/bin/bentoml serve service.service:ImgServe --host 127.0.0.1 --port "$port" > "$OUT/$spec.log" 2>&1 &
  else
    IFS='|' read -r start port path field <<< "${CONF[$name]:?unknown server $name}"
    [ "$name" = bentoml_naive10k ] && export R18_MAX_LATENCY_MS=10000
    "${PIN_SERVER[@]}" setsid bash "$PEERS/$start" "$port" > "$OUT/$name.log" 2>&1 &
  fi
  pid=$!; url="http://127.0.0.1:$port$path"
  if wait_2xx "$url" "$field" "$pid"; then
    "${PIN_CLIENT[@]}" timeout $(( SECONDS_PER_STEP * 6 + 120 )) "$PY" -m loadtests.openloop --url "$url" --image "$IMG" --field "$field" \
      --name "$spec (load $(cut -d' ' -f1-3 /proc/loadavg))" --slo-ms "$SLO_MS" --seconds "$SECONDS_PER_STEP" \
      --steps "$STEPS" --engine "$ENGINE" ${CAPACITY:+--capacity "$CAPACITY"} --json "$OUT/$spec.json" --md "$OUT/openloop.md" || echo "$name: open loop failed" >&2
  else
    echo "$name: exited or no 2xx answer within 300 s (see $OUT/$name.log)" >&2
  fi
  stop_group "$pid"; unset R18_MAX_LATENCY_MS
  [ "$name" = imgserve-haproxy ] && $PY -m deploy.replicas --workdir "$work" down >> "$OUT/$spec.log" 2>&1
done
echo "rows: $OUT/openloop.md (engine $ENGINE, commit $(git rev-parse --short HEAD), $(date -u +%FT%TZ))"
