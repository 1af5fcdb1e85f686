"""Goodput and p99 against offered load, one line per server, from loadtests.openloop JSON files.

    .venv/bin/python -m loadtests.openloop_plot out/*.json --title "digits 1024 px PNG, load 6" --out docs/img/overload.png

Each line is labelled with its file name. Offered load and goodput are in multiples of each server's own closed-loop capacity, so servers of
different speeds share the axes; the recovery phase is left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    for f in args.files:
        run = json.loads(f.read_text())
        steps = [s for s in run["steps"] if s["name"] != "recovery"]
        x = [s["rate"] / run["capacity"] for s in steps]
        ax_g.plot(x, [s["goodput"] / run["capacity"] for s in steps], "o-", label=f.stem)
        ax_p.plot(x, [s["p99_ms"] / 1000 for s in steps], "o-", label=f.stem)
    slo = run["slo_ms"] / 1000
    ax_g.set(xlabel="offered load (x closed-loop capacity)", ylabel=f"goodput: 2xx within {slo:g} s (x capacity)")
    ax_p.set(xlabel="offered load (x closed-loop capacity)", ylabel="p99 of 2xx answers (s, from due time)",
             yscale="log")
    ax_p.axhline(slo, color="grey", ls="--", lw=1, label="SLO")
    for ax in (ax_g, ax_p):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
