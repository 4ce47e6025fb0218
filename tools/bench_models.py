#!/usr/bin/env python
"""Latency of whole pruned models in onnxruntime: fast form (custom sparse ops) vs the dense original,
and the portable form, at several batch sizes and thread counts, measured in one run (medians).

Models: the shipped pruned LeNets (if present; see tools/reproduce_pruning.py) and AlexNet pruned to
Han et al.'s densities without retraining (its own seeded init; built under --work on first use).

    python tools/bench_models.py                       # batch 1,64; threads 1,2
    python tools/bench_models.py --models lenet-5 --batch 1 --threads 1
    python tools/bench_models.py --deepsparse ~/ds --reps 3   # side by side with DeepSparse 1.8, 1 thread

--deepsparse DS_VENV: stock onnxruntime on the dense original, the fast form, and DeepSparse 1.8 (its own
venv, see /work/shared/peers/README.md) on the same pruned weights written densely with their zeros;
each timing in its own process, the engines interleaved `--reps` times, medians; every engine's output
is compared with the fast form's (DeepSparse 1.8 computes wrong results for some shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

import toolchain
from toolchain import kernels, read_onnx
from toolchain.bench import format_timings, memory_bandwidth, time_model, weight_bytes
from toolchain.cli import main as toolchain_main
from toolchain.zoo import MODELS_DIR


def alexnet_files(work: Path) -> tuple[Path, Path, Path]:
    dense, portable, fast = work / "alexnet.onnx", work / "alexnet-pruned.onnx", work / "alexnet-pruned-fast.onnx"
    if not dense.exists():
        toolchain_main(["zoo", "export", "alexnet", "-o", str(dense)])
    if not portable.exists():
        toolchain_main(["compress", str(dense), "-r", str(MODELS_DIR / "alexnet" / "prune.toml"), "-o", str(portable),
                        "--no-retrain", "--no-progress"])
    toolchain_main(["export", str(portable), "-o", str(fast), "--form", "fast"])  # always: the fast form changes
    return dense, portable, fast


def lenet_files(name: str, work: Path) -> tuple[Path, Path, Path] | None:
    dense, portable = MODELS_DIR / name / f"{name}.onnx", MODELS_DIR / name / f"{name}-pruned.onnx"
    if not portable.exists():
        return None
    fast = work / f"{name}-pruned-fast.onnx"
    toolchain_main(["export", str(portable), "-o", str(fast), "--form", "fast"])
    return dense, portable, fast


def dense_with_zeros(pruned: Path, out: Path) -> Path:
    """The pruned model with plain dense layers holding its zeros (what DeepSparse reads): the dense form."""
    toolchain.export(toolchain.load(pruned), out, form="dense")
    return out


def sidebyside(args, names: list[str], work: Path) -> int:
    """Dense onnxruntime vs fast form vs DeepSparse on the same pruned weights, interleaved, 1 thread."""
    ds_python = Path(args.deepsparse).expanduser() / "bin" / "python"
    if not ds_python.exists():
        print(f"ERROR: {ds_python} not found; set up DeepSparse as /work/shared/peers/README.md says", file=sys.stderr)
        return 2
    lib = str(kernels.library_path())
    batches = [int(x) for x in args.batch.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"- CPU: {cpu} ({os.cpu_count()} logical CPUs); 1 thread; {args.reps} interleaved repetitions, each timing "
          f"in its own process ({args.seconds:g} s of runs, median), table: median over repetitions; load average at "
          f"start {os.getloadavg()[0]:.1f}\n")
    print("| model | batch | onnxruntime dense ms | fast form ms | DeepSparse ms | fast vs dense | fast vs DeepSparse "
          "| DeepSparse max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        files = alexnet_files(work) if name == "alexnet" else lenet_files(name, work)
        if files is None:
            continue
        dense, portable, fast = files
        zeros = dense_with_zeros(portable, work / f"{name}-pruned-dense-zeros.onnx")
        shape = [d.dim_value for d in read_onnx(dense).graph.input[0].type.tensor_type.shape.dim][1:]
        engines = {"dense": ("ort", dense, None), "fast": ("ort", fast, lib), "ds": ("ds", zeros, None)}
        for b in batches:
            times: dict[str, list[float]] = {k: [] for k in engines}
            outs = {}
            for rep in range(args.reps):
                for key, (backend, path, with_lib) in engines.items():
                    cmd = [str(ds_python) if backend == "ds" else sys.executable,
                           str(Path(__file__).resolve().parent / "engine_timing.py"), backend, str(path), str(b),
                           "--shape", ",".join(map(str, shape)), "--budget", str(args.seconds)]
                    if with_lib:
                        cmd += ["--lib", with_lib]
                    if rep == 0:
                        cmd += ["--out", str(work / f"out-{key}.npy")]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(f"ERROR: {name} {key} batch {b}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                        return 1
                    times[key].append(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])
                    if rep == 0:
                        outs[key] = np.load(work / f"out-{key}.npy")
            m = {k: statistics.median(v) for k, v in times.items()}
            diff = float(np.abs(outs["ds"] - outs["fast"]).max() / max(np.abs(outs["fast"]).max(), 1e-12))
            print(f"| {name} | {b} | {m['dense']:.3f} | {m['fast']:.3f} | {m['ds']:.3f} | {m['dense'] / m['fast']:.2f}x "
                  f"| {m['ds'] / m['fast']:.2f}x | {diff:.1e} |", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet-300-100,lenet-5,alexnet")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seconds", type=float, default=2.0, help="minimum timing time per configuration")
    ap.add_argument("--work", default="out/bench-models")
    ap.add_argument("--deepsparse", metavar="DS_VENV", help="side by side with DeepSparse 1.8 (its venv), 1 thread")
    ap.add_argument("--reps", type=int, default=3, help="--deepsparse: interleaved repetitions (default 3)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.deepsparse:
        return sidebyside(args, args.models.split(","), work)
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
