"""A real Prometheus on the loopback, scraping imgserve and evaluating deploy/monitoring/rules.yml.

    python -m deploy.monitoring.local --target 127.0.0.1:3000            # Prometheus on a free port
    python -m deploy.monitoring.local --target 127.0.0.1:3000 --port 9090 --for 10s

Runs Debian's `prometheus` (scripts/setup.sh installs it) with a config written to a temporary
folder, until Ctrl-C; the tests (tests/deploy/test_prometheus_e2e.py) start it the same way.

``--for`` is the one change to the rules that this allows: every alert's ``for:`` becomes that
duration, so a demo or a test sees an alert fire in seconds instead of minutes. Expressions,
thresholds, labels and annotations are the file's own (``shorten_for`` touches nothing else).
"""
from __future__ import annotations

import argparse
import copy
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import yaml

from service.launcher import Server, free_port

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yml"
JOB = "imgserve"  # the rules select job=~"(.*/)?imgserve"


def shorten_for(rules: dict, duration: str) -> dict:
    """The rule groups with every alert's ``for:`` set to ``duration``; nothing else changes."""
    out = copy.deepcopy(rules)
    for group in out["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = duration
    return out


def config(targets: list[str], rule_files: list[Path], scrape_s: float, eval_s: float) -> dict:
    """prometheus.yml: one job scraping imgserve's /metrics on ``targets`` (host:port)."""
    return {
        "global": {"scrape_interval": f"{scrape_s:g}s", "scrape_timeout": f"{min(scrape_s, 10):g}s",
                   "evaluation_interval": f"{eval_s:g}s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                            "static_configs": [{"targets": list(targets)}]}],
    }


def prometheus(workdir: Path, targets: list[str], *, port: int | None = None, scrape_s: float = 5.0,
               eval_s: float = 5.0, alert_for: str | None = None) -> Server:
    """A Prometheus server (not started yet) on 127.0.0.1, its config, rules and data in ``workdir``."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not installed: apt-get install prometheus (scripts/setup.sh does)")
    workdir.mkdir(parents=True, exist_ok=True)
    rules = RULES
    if alert_for is not None:
        rules = workdir / "rules.yml"
        rules.write_text(yaml.safe_dump(shorten_for(yaml.safe_load(RULES.read_text()), alert_for), sort_keys=False))
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config(targets, [rules], scrape_s, eval_s), sort_keys=False))
    port = port or free_port()
    cmd = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    return Server(cmd, f"http://127.0.0.1:{port}", workdir / "prometheus.log", cwd=workdir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", required=True, help="host:port of an imgserve server (repeatable)")
    ap.add_argument("--port", type=int, default=None, help="Prometheus's port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--scrape-s", type=float, default=5.0)
    ap.add_argument("--eval-s", type=float, default=5.0)
    ap.add_argument("--for", dest="alert_for", default=None, help="every alert's `for:` (e.g. 10s), demos only")
    args = ap.parse_args(argv)
    # Prometheus runs in its own session: a SIGTERM to us must still reach the `finally` that stops it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="imgserve-prometheus-") as tmp:
        server = prometheus(Path(tmp), args.target, port=args.port, scrape_s=args.scrape_s, eval_s=args.eval_s,
                            alert_for=args.alert_for).start()
        try:
            server.wait_ready("/-/ready", timeout_s=60)
            print(f"Prometheus: {server.url}  (alerts: {server.url}/alerts, log: {server.log_path})", flush=True)
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


if __name__ == "__main__":
    main()
