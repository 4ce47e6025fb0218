"""Table of a side-by-side run (../shared/peers/run_sidebyside.sh or alexnet_sidebyside.sh): each line of
its output is one timing as JSON (backend, model, batch, threads, ms, checksum). Prints, per model family and
batch, the median over the interleaved repetitions of each engine, every repetition, the checksums, and the
ratios of the project's fast form against stock onnxruntime (dense) and DeepSparse.

    bash ../shared/peers/alexnet_sidebyside.sh .venv . ~/ds sbs-alex 5 > sbs-alex.jsonl
    python tools/sidebyside_table.py sbs-alex.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict

NAMES = {"ort": "onnxruntime dense", "ort+lib": "fast form (this library)", "ds": "DeepSparse 1.8"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", help="output of the side-by-side script")
    args = ap.parse_args(argv)
    runs: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with open(args.jsonl) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue  # the scripts' own progress lines
            r = json.loads(line)
            runs[(r["batch"], r["threads"])][r["backend"]].append(r)
    if not runs:
        print(f"error: no timings in {args.jsonl}", file=sys.stderr)
        return 2
    print("| batch | threads | engine | model file | median ms | the repetitions (ms) | checksum |")
    print("|---:|---:|---|---|---:|---|---:|")
    ratios = []
    for (batch, threads), by in sorted(runs.items()):
        med = {}
        for backend in ("ort", "ort+lib", "ds"):
            rs = by.get(backend, [])
            if not rs:
                continue
            med[backend] = statistics.median(r["ms"] for r in rs)
            sums = ", ".join(sorted({f"{r['checksum']:.6g}" for r in rs}))
            reps = " ".join(f"{r['ms']:.1f}" for r in rs)
            print(f"| {batch} | {threads} | {NAMES[backend]} | {rs[0]['model']} | {med[backend]:.2f} | {reps} | {sums} |")
        if "ort+lib" in med:
            ratios.append((batch, threads, med.get("ort", float("nan")) / med["ort+lib"],
                           med.get("ds", float("nan")) / med["ort+lib"]))
    print("\n| batch | threads | fast form vs onnxruntime dense | fast form vs DeepSparse |")
    print("|---:|---:|---:|---:|")
    for batch, threads, vs_dense, vs_ds in ratios:
        print(f"| {batch} | {threads} | {vs_dense:.2f}x | {vs_ds:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
