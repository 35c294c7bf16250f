#!/usr/bin/env python3
"""Sum Nsight Compute's per-kernel durations by kernel name: a Markdown table, most expensive first.

Reads what `ncu --csv --metrics gpu__time_duration.sum <program>` wrote to stdout (the program's own
lines and ncu's `==PROF==` lines mixed in are skipped: only the CSV block from its `"ID",...` header
on is read). Each row is one kernel launch; its `Metric Value` is in the row's `Metric Unit`
(nsecond, usecond, msecond or second; ncu may write thousands separators).

    python3 tools/ncu_summary.py ncu-step.csv > ncu-step.md

scripts/device-check.sh runs it with NCU=1 over one training step (benches/cuda.rs,
CUDA_BENCH_PROFILE=ncu). Standard library only: the GPU machine's python3 runs it.
"""
import csv
import sys
from collections import defaultdict

UNIT_NS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}
METRIC = "gpu__time_duration.sum"


def launches(lines):
    """(kernel name, duration in ns) per launch."""
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV header (a line starting with \"ID\") in the input")
    block = [l for l in lines[start:] if l.startswith('"')]
    out = []
    for row in csv.DictReader(block):
        if row.get("Metric Name") != METRIC:
            continue
        unit = row.get("Metric Unit", "")
        if unit not in UNIT_NS:
            raise ValueError(f"launch {row.get('ID')}: unknown unit {unit!r}")
        value = float(row["Metric Value"].replace(",", ""))
        out.append((row["Kernel Name"], value * UNIT_NS[unit]))
    return out


def table(rows):
    by_name = defaultdict(lambda: [0, 0.0])
    for name, ns in rows:
        by_name[name][0] += 1
        by_name[name][1] += ns
    total = sum(ns for _, ns in rows)
    lines = [f"{len(rows)} kernel launches, {total / 1e3:.1f} µs of kernel time (each kernel timed alone)", "",
             "| kernel | launches | total (µs) | share | mean (µs) |", "|---|---:|---:|---:|---:|"]
    for name, (n, ns) in sorted(by_name.items(), key=lambda kv: (-kv[1][1], kv[0])):
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short}` | {n} | {ns / 1e3:.1f} | {100 * ns / total if total else 0:.1f} % | {ns / n / 1e3:.2f} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    try:
        rows = launches(lines)
    except ValueError as e:
        print(f"error: {argv[1]}: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"error: {argv[1]}: no {METRIC} rows (was the step inside cuProfilerStart/Stop?)", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
