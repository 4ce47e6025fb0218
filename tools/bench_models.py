#!/usr/bin/env python
"""Latency of whole pruned models in onnxruntime: fast form (custom sparse ops) vs the dense original,
and the portable form, at several batch sizes and thread counts, measured in one run (medians).

Models: the shipped pruned LeNets (if present; see tools/reproduce_pruning.py) and AlexNet pruned to
Han et al.'s densities without retraining (its own seeded init; built under --work on first use).

    python tools/bench_models.py                       # batch 1,64; threads 1,2
    python tools/bench_models.py --models lenet-5 --batch 1 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolchain.bench import format_timings, memory_bandwidth, time_model, weight_bytes
from toolchain.cli import main as toolchain_main
from toolchain import read_onnx
from toolchain.zoo import MODELS_DIR


def alexnet_files(work: Path) -> tuple[Path, Path, Path]:
    dense, portable, fast = work / "alexnet.onnx", work / "alexnet-pruned.onnx", work / "alexnet-pruned-fast.onnx"
    if not dense.exists():
        toolchain_main(["zoo", "export", "alexnet", "-o", str(dense)])
    if not portable.exists():
        toolchain_main(["compress", str(dense), "-r", str(MODELS_DIR / "alexnet" / "prune.toml"), "-o", str(portable),
                        "--no-retrain", "--no-progress"])
    if not fast.exists():
        toolchain_main(["export", str(portable), "-o", str(fast), "--form", "fast"])
    return dense, portable, fast


def lenet_files(name: str, work: Path) -> tuple[Path, Path, Path] | None:
    dense, portable = MODELS_DIR / name / f"{name}.onnx", MODELS_DIR / name / f"{name}-pruned.onnx"
    if not portable.exists():
        return None
    fast = work / f"{name}-pruned-fast.onnx"
    if not fast.exists():
        toolchain_main(["export", str(portable), "-o", str(fast), "--form", "fast"])
    return dense, portable, fast


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet-300-100,lenet-5,alexnet")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timing time per configuration")
    ap.add_argument("--work", default="out/bench-models")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bw = memory_bandwidth()
    print(f"measured memory read bandwidth: {bw / 1e9:.1f} GB/s\n")
    for name in args.models.split(","):
        files = alexnet_files(work) if name == "alexnet" else lenet_files(name, work)
        if files is None:
            print(f"{name}: no pruned model shipped yet (run tools/reproduce_pruning.py); skipped\n")
            continue
        dense, portable, fast = (read_onnx(p) for p in files)
        rows = []
        for th in (int(t) for t in args.threads.split(",")):
            for b in (int(x) for x in args.batch.split(",")):
                base = time_model(dense, f"{name} dense", b, th, min_seconds=args.seconds)
                rows.append((time_model(fast, f"{name} pruned, fast", b, th, min_seconds=args.seconds), base))
                rows.append((time_model(portable, f"{name} pruned, portable", b, th, min_seconds=args.seconds), base))
        floor = {b: weight_bytes(fast) / bw * 1e3 for b in (int(x) for x in args.batch.split(","))}
        print(f"### {name}\n")
        print(format_timings(rows, floor))
        print(f"\n(bandwidth floor: the fast form's weight bytes, {weight_bytes(fast):,}, read once)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
