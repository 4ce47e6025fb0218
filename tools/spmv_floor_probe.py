#!/usr/bin/env python
"""Why the fp32 batch-1 sparse kernel stays above the bandwidth floor: timing probes over its layout.

Compiles tools/spmv_floor_probe.cc with the library's toolchain/kernels/csrc/kernels_avx2.cc (a C++ compiler is
needed; AVX2 + FMA CPUs only) and runs it on AlexNet's
fc stack at 10 % density in the fp32 fast form's layout. It prints one table: per probe, the nanoseconds per kept
weight with the weights streamed from memory (caches flushed before each run) and with a small layer held in L2.
The floor is the `one_stream` probe: a sequential read of a buffer as large as the weights, timed in the same
interleaved runs as the others. Only the first three probes compute the product (checked against float64); the
others read the same value and index streams but load fewer x values per kept weight. One thread, medians.

    python tools/spmv_floor_probe.py [--runs 30] [--rows 4096] [--bw-mib 1024]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from toolchain.bench import cpu_flags, cpu_name

SOURCE = Path(__file__).resolve().parent / "spmv_floor_probe.cc"
KERNELS = Path(__file__).resolve().parents[1] / "toolchain" / "kernels" / "csrc"  # the library's batch-1 kernel

# name -> (what it does per 16 kept weights, memory loads per kept weight)
PROBES = {
    "chunks": ("the product over chunks of 8 values + their 8 16-bit indices, indices read as 64-bit words (the "
               "library's batch-1 layout since stop 22 and its AVX2 kernel, linked in)", 1.5),
    "gather": ("the product over separate value and index arrays: 16 x values loaded by index into 4-lane vectors "
               "(the library's AVX2 loop until stop 21)", 2.25),
    "idx64": ("the product, indices read as 64-bit words and split with shifts", 1.5),
    "half": ("8 x values loaded by index, each used twice (wrong result)", 1.25),
    "fixed": ("16 x values loaded at addresses that do not depend on the indices", 1.25),
    "none": ("no x loads: values times indices", 0.25),
    "none_fp": ("no x loads, plus 32 vector multiplies and 6 adds", 0.25),
    "two_streams": ("the value and index arrays read in one loop, no row segments (32-byte loads)", 0.19),
    "one_stream": ("one sequential read of a buffer of the same size (32-byte loads)", 0.19),
}


def build(workdir: Path) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise SystemExit("error: no C++ compiler found (set CXX)")
    exe = workdir / "spmv_floor_probe"
    cmd = [cxx, "-O3", "-std=c++17", "-mavx2", "-mfma", "-I", str(KERNELS), str(SOURCE), str(KERNELS / "kernels_avx2.cc"),
           "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: compiling {SOURCE.name} failed:\n{r.stderr}")
    return exe


def parse(text: str) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    lines = text.split("\n")
    head = lines[0].split()
    meta = {head[i]: float(head[i + 1]) for i in range(0, len(head), 2)}
    rows = {}
    for line in lines[1:]:
        if line.strip():
            name, streamed, resident = line.split()
            rows[name] = (float(streamed), float(resident))
    return meta, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=30, help="interleaved timed runs per probe (default 30)")
    p.add_argument("--rows", type=int, default=4096, help="rows of fc6 / fc7 (default 4096: AlexNet)")
    p.add_argument("--bw-mib", type=int, default=1024, help="buffer for the bandwidth pass and cache flush (MiB)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.rows < 16 or args.bw_mib < 1:
        p.error("--runs and --bw-mib must be >= 1 and --rows >= 16")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= cpu_flags():
        print("error: this probe needs an x86-64 CPU with AVX2 and FMA", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spmv-probe-") as d:
        exe = build(Path(d))
        r = subprocess.run([str(exe), str(args.rows), str(args.runs), str(args.bw_mib)], capture_output=True, text=True)
    if r.returncode:
        print(f"error: the probe failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        return 1
    meta, rows = parse(r.stdout)
    if not meta["error"] < 1e-3:  # |y| is ~5 here; float32 sums of ~900 terms err by ~1e-5
        print(f"error: the product probe is wrong (largest error {meta['error']:g})", file=sys.stderr)
        return 1
    floor = rows["one_stream"][0]  # ns per kept weight: a sequential read of the same bytes, in the same runs
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); 1 thread; {args.runs} interleaved runs, medians")
    print(f"- fc stack {args.rows}-row fc6/fc7 at 10 % density: {int(meta['nnz']):,} kept weights, "
          f"{meta['bytes_per_nz']:.2f} bytes each (fp32 value + 16-bit index + segment offsets; in chunks, padding "
          f"included: {meta['chunk_bytes_per_nz']:.2f})")
    print(f"- floor: one sequential read of a buffer of the weights' size, timed in the same interleaved runs: "
          f"{floor:.3f} ns per kept weight ({meta['bytes_per_nz'] / floor:.1f} GB/s; one AVX2 pass over "
          f"{args.bw_mib} MiB after the runs: {meta['bandwidth']:.1f} GB/s)\n")
    print("| probe | per 16 kept weights | loads / kept weight | streamed ns | x floor | L2-resident ns |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (what, loads) in PROBES.items():
        streamed, resident = rows[name]
        res = f"{resident:.3f}" if resident else "-"
        print(f"| {name} | {what} | {loads:g} | {streamed:.3f} | {streamed / floor:.2f} | {res} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
