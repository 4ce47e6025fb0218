#!/usr/bin/env python
"""Reproduce Han et al. 2015 ("Learning both Weights and Connections") on the shipped LeNets.

Runs each model's prune recipe from its shipped dense ONNX (toolchain compress), then prints a
table shaped like the paper's Table 1 (error, parameters, compression) and per-layer weight% /
FLOP% tables like its Tables 2 and 3, measured on the exported files in onnxruntime.

    python tools/reproduce_pruning.py                      # both LeNets: rewrites models/*/NAME-pruned.onnx
    python tools/reproduce_pruning.py --skip-existing      # only the tables, from the shipped pruned files
    python tools/reproduce_pruning.py --out out/repro      # write the pruned files elsewhere
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import toolchain
from toolchain.cli import main as toolchain_main
from toolchain.zoo import get_model_spec

PAPER = {  # Han et al. 2015, Table 1: error before -> after, parameters, compression
    "lenet-300-100": ("1.64%", "1.59%", "267K", "22K", "12x"),
    "lenet-5": ("0.80%", "0.77%", "431K", "36K", "12x"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet-300-100,lenet-5")
    ap.add_argument("--out", default=None, help="folder for the pruned files (default: models/NAME/)")
    ap.add_argument("--plots", default="out/reproduce-pruning", help="folder for the sparsity-pattern PNGs")
    ap.add_argument("--threads", default="1", help="torch threads for retraining (default 1)")
    ap.add_argument("--skip-existing", action="store_true", help="reuse pruned files that already exist")
    args = ap.parse_args()
    rows, per_layer = [], []
    for name in args.models.split(","):
        spec = get_model_spec(name)
        dense = spec.onnx_path
        pruned = (Path(args.out) if args.out else spec.folder) / f"{name}-pruned.onnx"
        t0 = time.time()
        reuse = args.skip_existing and pruned.exists()
        if not reuse:
            rc = toolchain_main(["compress", str(dense), "-r", str(spec.folder / "prune.toml"), "-o", str(pruned),
                                 "--plots", str(Path(args.plots) / name), "--threads", args.threads, "--no-progress"])
            if rc:
                return rc
        minutes = None if reuse else (time.time() - t0) / 60
        before, after = toolchain.info(dense), toolchain.info(pruned)
        (b_stats, b_tot), (a_stats, a_tot) = (before.layers, before.totals), (after.layers, after.totals)
        e_b = toolchain.evaluate(dense).error
        e_a = toolchain.evaluate(pruned).error
        rows.append((name, e_b, e_a, b_tot, a_tot, minutes))
        a_by = {s.name: s for s in a_stats}
        per_layer.append((name, [(s, a_by.get(s.name)) for s in b_stats], b_tot, a_tot))

    print("\n## Table 1 (Han et al. 2015 layout): pruning without loss of accuracy\n")
    print("| network | top-1 error | parameters (non-zero) | compression | file bytes | run (min) | paper |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, e_b, e_a, bt, at, minutes in rows:
        p = PAPER.get(name, ("", "", "", "", ""))
        print(f"| {name} ref | {100 * e_b:.2f}% | {bt['nnz']:,} | | {bt['file_bytes']:,} | | {p[0]}, {p[2]} |")
        print(f"| {name} pruned | {100 * e_a:.2f}% | {at['nnz']:,} | **{bt['params'] / at['nnz']:.1f}x** | "
              f"{at['file_bytes']:,} | {'existing' if minutes is None else f'{minutes:.1f}'} | {p[1]}, {p[3]}, {p[4]} |")
    for name, layers, bt, at in per_layer:
        print(f"\n## {name}: per layer (Tables 2-3 layout)\n")
        print("| layer | weights | FLOP | weights % | FLOP % |")
        print("|---|---:|---:|---:|---:|")
        for s, a in layers:
            if a is None:
                continue
            print(f"| {s.name} | {s.params:,} | {2 * s.macs_dense:,} | {100 * a.nnz / s.params:.1f}% | "
                  f"{100 * a.macs / max(s.macs_dense, 1):.1f}% |")
        print(f"| total | {bt['params']:,} | {2 * bt['macs_dense']:,} | {100 * at['nnz'] / bt['params']:.2f}% | "
              f"{100 * at['macs'] / max(bt['macs_dense'], 1):.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
