"""Paired comparison of ELS-vs-network r across ``patchmosaic evaluate`` runs on the same seeds.

    python scripts/paired_r.py BASE/metrics.json RUN/metrics.json [RUN2/metrics.json ...] [--labels a,b,c]

Each run may have its own network and schedule (an ablation: a network trained
longer, wider, ...); the seeds are what pairs them. For every run prints the
median Pearson r of ELS with its network [bootstrap 95% CI] and, against the
first file, the median of the per-seed difference r_run - r_base [bootstrap
95% CI] and on how many of the shared seeds the run's r is higher, and the
run's lowest r and share of seeds with r >= 0.95 (the Table-1 target). Seeds that a
file lacks are left out of its pairing (the count says how many were paired).
A markdown table goes to stdout (``--out`` writes it to a file as well).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from patchmosaic.comparison import format_interval
from patchmosaic.evaluation import bootstrap_median

KEY = "pearson_r_els"


def per_seed_r(path: Path) -> dict[int, float]:
    """``{seed: r}`` of ELS against the network from one ``evaluate`` metrics.json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"paired_r.py: cannot read {path}: {err}") from err
    rows = data.get("per_seed") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or any(KEY not in row or "seed" not in row for row in rows):
        raise SystemExit(f"paired_r.py: {path} is not an `evaluate` metrics.json (no per_seed {KEY})")
    return {int(row["seed"]): float(row[KEY]) for row in rows}


def build_table(paths: list[Path], labels: list[str]) -> str:
    runs = [per_seed_r(p) for p in paths]
    base = runs[0]
    header = ("| run | seeds | ELS median r [95% CI] | paired difference to the first, median [95% CI] | "
              "seeds with higher r | lowest r / seeds with r >= 0.95 |")
    lines = [header, "|---|---|---|---|---|---|"]
    for label, run in zip(labels, runs):
        r = np.array(list(run.values()))
        own = bootstrap_median(r)
        shared = sorted(set(run) & set(base))
        if not shared:
            raise SystemExit(f"paired_r.py: {label} shares no seed with {labels[0]}")
        diff = np.array([run[s] - base[s] for s in shared])
        paired = "–" if run is base else format_interval(bootstrap_median(diff), fmt="+.3f")
        wins = "–" if run is base else f"{int((diff > 0).sum())}/{len(shared)}"
        tail = f"{r.min():.3f} / {100 * (r >= 0.95).mean():.0f}%"
        lines.append(f"| {label} | {len(run)} | {format_interval(own)} | {paired} | {wins} | {tail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, nargs="+", help="evaluate metrics.json files; the first is the base")
    parser.add_argument("--labels", help="comma-separated row labels (default: the files' folder names)")
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if len(args.metrics) < 2:
        parser.error("give a base metrics.json and at least one run to pair with it")
    labels = args.labels.split(",") if args.labels else [p.parent.name for p in args.metrics]
    if len(labels) != len(args.metrics):
        parser.error(f"--labels has {len(labels)} entries for {len(args.metrics)} files")
    table = build_table(args.metrics, labels)
    sys.stdout.write(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
