"""The local stand-in for a Kubernetes Service: N replicas of the image behind HAProxy on 127.0.0.1.

    python -m deploy.replicas up -n 2                      # make replicas N=2
    python -m deploy.replicas up -n 2 --bundle bundles/default
    python -m deploy.replicas up -n 2 --grpc-port 8001          # and OIP over gRPC, balanced per call
    python -m deploy.replicas status
    python -m deploy.replicas up -n 2 --share /srv/bundles --share /srv/policy \
        -e IMGSERVE_MODELS=digits@v1=/srv/bundles/a,digits@v2=/srv/bundles/b -e IMGSERVE_TRAFFIC=/srv/policy/traffic.yaml
    python -m deploy.replicas roll --bundle bundles/digits-v2   # one replica at a time
    python -m deploy.replicas down                         # make replicas-down

`up` returns once HAProxy serves on --port (default 8080); everything binds 127.0.0.1. State and
logs are in --workdir (default .replicas/). docs/scaleout.md explains the HAProxy settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from deploy.replicas.cluster import Cluster
from deploy.replicas.haproxy import Settings
from deploy.replicas.runners import RUNNERS

DEFAULT_IMAGE = os.environ.get("IMGSERVE_IMAGE", "localhost/imgserve:cpu")  # what `make image` builds


def _env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep or not k.startswith("IMGSERVE_"):
            raise SystemExit(f"-e takes IMGSERVE_NAME=VALUE, got {p!r}")
        out[k] = v
    return out


def _threads(n: int, env: dict[str, str]) -> dict[str, str]:
    """Each replica gets its share of the cores as intra-op threads (as IMGSERVE_THREADS follows the
    CPU limit in deploy/k8s); more threads than that would only fight over the same cores."""
    return {"IMGSERVE_THREADS": str(max(1, (os.cpu_count() or 1) // n)), **env}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(".replicas"), help="state and logs (default .replicas)")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start N replicas and HAProxy")
    up.add_argument("-n", type=int, default=2, help="replicas (default 2)")
    up.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image (default {DEFAULT_IMAGE}; $IMGSERVE_IMAGE)")
    up.add_argument("--runner", default="podman", choices=sorted(RUNNERS), help="podman (default) or process")
    up.add_argument("--bundle", type=Path, help="serve this bundle directory, mounted read-only (default: the image's model)")
    up.add_argument("--port", type=int, default=8080, help="HAProxy's port on 127.0.0.1 (default 8080; 0: any free port)")
    up.add_argument("--grpc-port", type=int, default=None,
                    help="also balance OIP over gRPC (h2c) on this 127.0.0.1 port (0: any free port; default: no gRPC)")
    up.add_argument("-e", dest="env", action="append", default=[], help="IMGSERVE_NAME=VALUE for every replica")
    up.add_argument("--server-maxconn", type=int, default=0,
                    help="requests in flight per replica; more wait in HAProxy's queue (default 0: no limit)")
    up.add_argument("--queue-timeout-ms", type=int, default=5000,
                    help="a queued request's longest wait in HAProxy before its 503 (default 5000)")
    up.add_argument("--http-reuse", default="safe", choices=("safe", "always", "never"),
                    help="HAProxy's http-reuse toward the replicas (default safe; always: also a client connection's first request)")
    up.add_argument("--share", action="append", default=[], type=Path,
                    help="a host folder every replica reads at the same path, read-only (bundles, the traffic policy's folder)")
    roll = sub.add_parser("roll", help="replace every replica, one at a time, with one serving --bundle")
    roll.add_argument("--bundle", type=Path, help="bundle directory of the new model version")
    roll.add_argument("-e", dest="env", action="append", default=[], help="IMGSERVE_NAME=VALUE for the new replicas")
    sub.add_parser("status", help="HAProxy's view of each slot")
    sub.add_parser("down", help="stop HAProxy and every replica")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.cmd == "up":
        if (args.workdir / "state.json").exists():
            raise SystemExit(f"replicas already run from {args.workdir}: `make replicas-down` first")
        if args.bundle is not None and not (args.bundle / "manifest.json").is_file():
            raise SystemExit(f"{args.bundle} is not a bundle (no manifest.json); make one with: python -m export CHECKPOINT --out DIR")
        c = Cluster(args.workdir, runner=args.runner, image=args.image, shared=[str(d.resolve()) for d in args.share])
        try:
            c.up(args.n, _threads(args.n, _env(args.env)), args.bundle, args.port, grpc_port=args.grpc_port,
                 settings=Settings(server_maxconn=args.server_maxconn, queue_timeout_ms=args.queue_timeout_ms,
                                   http_reuse=args.http_reuse))
        except BaseException:
            c.down()
            raise
        print(c.describe())
        print(f"serving on {c.url}{f' and gRPC on {c.grpc_url}' if c.grpc_port else ''}   (stop: make replicas-down)")
        return 0
    c = Cluster.load(args.workdir)
    if args.cmd == "roll":
        n = len(c.replicas())
        c.roll(_threads(n, _env(args.env)), args.bundle)
        print(c.describe())
    elif args.cmd == "status":
        print(c.describe())
    elif args.cmd == "down":
        c.down()
        print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
