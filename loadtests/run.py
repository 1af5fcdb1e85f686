"""One bounded, headless locust run against the service; writes CSV, the HTML report and a summary.

    .venv/bin/python -m loadtests.run --host http://127.0.0.1:3000 --users 16 --duration 30s
    .venv/bin/python -m loadtests.run --start-service bundles/default --users 16 --duration 30s

Results go to loadtests/results/RUN/ (git-ignored): locust_stats.csv, locust_failures.csv,
locust_stats_history.csv, report.html, locust.log, summary.txt, summary.json, final_stats.json (exact
end-of-run figures) and service.log when the service was started here. Exit status: 0 when every
request passed its checks, 1 when some failed, 2 for a usage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from service import launcher
from loadtests.summary import summarize

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# The run's clock starts after the warm-up (payloads, known labels: seconds, more on a busy machine);
# locust's own -t and the process timeout get this much on top as outer bounds.
START_SLACK_S = 240


def parse_duration(text: str) -> int:
    """'30s', '2m', '1h30m', '45' -> seconds."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    parts = re.findall(r"(\d+)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}; use e.g. 30s, 2m, 1h30m")
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.splitlines()[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="base URL of a running service (loopback or your deployment)")
    target.add_argument("--start-service", metavar="BUNDLE", nargs="+",
                        help="start `bentoml serve` for these bundle dirs on a free 127.0.0.1 port, stop it after")
    ap.add_argument("--users", type=int, default=16, help="concurrent simulated users (default 16)")
    ap.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("30s"), help="run time (default 30s)")
    ap.add_argument("--max-requests", type=int, default=0, help="also stop after this many requests (0: no limit)")
    ap.add_argument("--models", default="", help="comma list: only these served models (default: all)")
    ap.add_argument("--photo-sides", default="", help="comma list of photo sizes to send, from 300,640,1000,2000")
    ap.add_argument("--wait", type=float, default=0.0, help="think time per user, uniform 0..W seconds (default 0)")
    ap.add_argument("--out", type=Path, default=None, help="results dir (default loadtests/results/RUN)")
    ap.add_argument("--name", default=None, help="RUN name (default: a timestamp)")
    ap.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for a started service")
    return ap


def preflight(host: str) -> None:
    """Fail in one line when nothing usable answers at `host`."""
    try:
        with urllib.request.urlopen(host.rstrip("/") + "/models", timeout=10) as r:
            json.loads(r.read())
    except (OSError, ValueError) as e:
        raise SystemExit(f"no imgserve service answers GET {host.rstrip('/')}/models ({e}); "
                         f"start one (make serve) or use --start-service BUNDLE")


def run_locust(host: str, out: Path, args: argparse.Namespace) -> int:
    """Headless locust, bounded by --duration (and a hard timeout on top); returns its exit status."""
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--host", host,
           "-u", str(args.users), "-r", str(args.spawn_rate or args.users), "-t", f"{args.duration + START_SLACK_S}s",
           "--stop-timeout", "10", "--csv", str(out / "locust"), "--csv-full-history",
           "--html", str(out / "report.html"), "--only-summary", "--logfile", str(out / "locust.log")]
    env = {**os.environ, "LOADTEST_RUN_SECONDS": str(args.duration), "LOADTEST_MAX_REQUESTS": str(args.max_requests),
           "LOADTEST_MODELS": args.models, "LOADTEST_FINAL_STATS": str(out / "final_stats.json"),
           "LOADTEST_PHOTO_SIDES": args.photo_sides, "LOADTEST_WAIT": str(args.wait),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    log.info("locust: %d users, %d s, max %s requests -> %s", args.users, args.duration, args.max_requests or "-", out)
    with open(out / "locust.stdout.txt", "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=args.duration + START_SLACK_S + 60)
        except subprocess.TimeoutExpired:
            log.error("locust overran its time bound; stopping pid %d", proc.pid)
            proc.terminate()
            try:
                return proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    name = args.name or time.strftime("%Y%m%d-%H%M%S") + f"-u{args.users}"
    out = args.out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if args.start_service:
            server = launcher.service_server(args.start_service, launcher.free_port(), out / "service.log").start()
            took = server.wait_ready(timeout_s=args.ready_timeout)
            log.info("service ready at %s after %.1f s", server.url, took)
            host = server.url
        else:
            host = args.host
        preflight(host)
        code = run_locust(host, out, args)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    if not (out / "locust_stats.csv").exists():
        print(f"error: locust wrote no statistics (exit {code}); see {out / 'locust.log'}", file=sys.stderr)
        return 2
    summary = summarize(out / "locust", out / "final_stats.json")
    text = summary.format()
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    print(text)
    print(f"\nresults: {out}  (report.html, locust_*.csv, summary.txt)")
    return 1 if summary.total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
