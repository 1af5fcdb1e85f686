"""Turn a locust run's CSV files into a short summary: req/s, p50/p95/p99, failures by kind."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

# locust wraps the message given to response.failure(): CatchResponseError('wrong_label')
_WRAPPED = re.compile(r"^(?:[A-Za-z]+Error|[A-Za-z]+Exception)\((['\"])(.*)\1\)$", re.S)


@dataclass
class RowStats:
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass
class Summary:
    total: RowStats
    rows: list[RowStats]
    failures_by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Fixed-width text table."""
        t = self.total
        lines = [f"requests {t.requests}  failures {t.failures} ({100 * t.failures / max(t.requests, 1):.2f} %)  "
                 f"{t.rps:.1f} req/s  p50 {_ms(t.p50_ms)}  p95 {_ms(t.p95_ms)}  p99 {_ms(t.p99_ms)}", "",
                 f"{'request':<36} {'count':>7} {'fails':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]
        for r in self.rows:
            lines.append(f"{r.name[:36]:<36} {r.requests:>7} {r.failures:>6} {r.rps:>7.1f} {_ms(r.p50_ms):>8} "
                         f"{_ms(r.p95_ms):>8} {_ms(r.p99_ms):>8}")
        lines += ["", "failures by kind:" + ("" if self.failures_by_kind else " none")]
        lines += [f"  {k:<40} {n:>7}" for k, n in sorted(self.failures_by_kind.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _num(v: str | None) -> float | None:
    if v in (None, "", "N/A"):
        return None
    return float(v)


def _row(r: dict[str, str]) -> RowStats:
    name = f"{r['Type']} {r['Name']}".strip() if r["Name"] != "Aggregated" else "Aggregated"
    return RowStats(name, int(r["Request Count"]), int(r["Failure Count"]), float(r["Requests/s"]),
                    _num(r.get("50%")), _num(r.get("95%")), _num(r.get("99%")))


def failure_kind(error: str) -> str:
    """'CatchResponseError(\\'wrong_label\\')' -> 'wrong_label'; other errors keep their text."""
    m = _WRAPPED.match(error.strip())
    return m.group(2) if m else error.strip()


def summarize_final(path: str | Path) -> Summary:
    """Read the exact final figures the locustfile writes at exit (LOADTEST_FINAL_STATS)."""
    data = json.loads(Path(path).read_text())

    def row(e: dict, name: str | None = None) -> RowStats:
        return RowStats(name or f"{e['method']} {e['name']}".strip(), e["requests"], e["failures"], e["rps"],
                        e["p50_ms"], e["p95_ms"], e["p99_ms"])

    kinds: Counter[str] = Counter()
    for err in data["errors"]:
        kinds[failure_kind(err["error"])] += err["occurrences"]
    return Summary(row(data["total"], "Aggregated"), [row(e) for e in data["entries"]], dict(kinds))


def summarize(csv_prefix: str | Path, final_json: str | Path | None = None) -> Summary:
    """The run's summary: from `final_json` when it exists, else PREFIX_stats.csv and PREFIX_failures.csv
    written by `locust --csv PREFIX` (those can lag the end of the run by up to a second)."""
    if final_json is not None and Path(final_json).is_file():
        return summarize_final(final_json)
    prefix = str(csv_prefix)
    with open(prefix + "_stats.csv", newline="") as fh:
        rows = [_row(r) for r in csv.DictReader(fh)]
    total = next((r for r in rows if r.name == "Aggregated"), None)
    if total is None:
        raise ValueError(f"{prefix}_stats.csv has no Aggregated row (did locust run?)")
    kinds: Counter[str] = Counter()
    fpath = Path(prefix + "_failures.csv")
    if fpath.exists():
        with open(fpath, newline="") as fh:
            for r in csv.DictReader(fh):
                kinds[failure_kind(r["Error"])] += int(r["Occurrences"])
    return Summary(total, [r for r in rows if r.name != "Aggregated"], dict(kinds))
