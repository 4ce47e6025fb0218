#!/usr/bin/env python
"""Benchmark AlexNet's fc stack (9216-4096-4096-1000, ReLU between) pruned by magnitude:
dense onnxruntime (Gemm) vs the SparseLinear custom op, batch 1 and 64, 1 and 2 intra-op threads.

Prints markdown tables: median and IQR per configuration, the speedup measured in the same run
(dense and sparse runs alternate), and the batch-1 bandwidth floor (bytes of the sparse weights /
this machine's measured read bandwidth).

    python tools/bench_sparse_fc.py [--runs 50] [--threads 1 2] [--batches 1 64]
    python tools/bench_sparse_fc.py --sweep [--runs 20]   # break-even density, one 4096x4096 layer
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from toolchain import kernels
from toolchain.kernels import csr
from toolchain.bench import memory_bandwidth

LAYERS = [("fc6", 9216, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]
DENSITIES = {
    "90% sparse": {"fc6": 0.10, "fc7": 0.10, "fc8": 0.10},
    "Han et al. (9/9/25%)": {"fc6": 0.09, "fc7": 0.09, "fc8": 0.25},
}


def make_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, k, m in LAYERS:
        w = rng.standard_normal((m, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / k))
        b = rng.standard_normal(m, dtype=np.float32) * np.float32(0.01)
        out[name] = (w, b)
    return out


def magnitude_prune(w: np.ndarray, density: float) -> np.ndarray:
    """Keep the round(density * size) largest-magnitude weights."""
    keep = int(round(density * w.size))
    if keep >= w.size:
        return w.copy()
    thresh = np.partition(np.abs(w).ravel(), w.size - keep)[w.size - keep]
    return np.where(np.abs(w) >= thresh, w, np.float32(0)).astype(np.float32)


def _graph(nodes, inits, name):
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", LAYERS[0][1]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", LAYERS[-1][2]])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=csr.opset_imports(), ir_version=csr.IR_VERSION)


def dense_model(weights) -> onnx.ModelProto:
    nodes, inits, x = [], [], "X"
    for i, (name, _, _) in enumerate(LAYERS):
        w, b = weights[name]
        inits += [numpy_helper.from_array(w, f"{name}.W"), numpy_helper.from_array(b, f"{name}.b")]
        y = "Y" if i == len(LAYERS) - 1 else f"{name}.out"
        nodes.append(helper.make_node("Gemm", [x, f"{name}.W", f"{name}.b"], [y], name=name, transB=1))
        if i < len(LAYERS) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{name}.relu"]))
            y = f"{name}.relu"
        x = y
    return _graph(nodes, inits, "fc_dense")


def sparse_model(weights) -> onnx.ModelProto:
    nodes, inits, x = [], [], "X"
    for i, (name, _, _) in enumerate(LAYERS):
        w, b = weights[name]
        y = "Y" if i == len(LAYERS) - 1 else f"{name}.out"
        node, tensors = csr.sparse_linear_node(x, y, w, b, name=name)
        nodes.append(node)
        inits += tensors
        if i < len(LAYERS) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{name}.relu"]))
            y = f"{name}.relu"
        x = y
    return _graph(nodes, inits, "fc_sparse")


def sparse_bytes(weights) -> int:
    total = 0
    for name, _, _ in LAYERS:
        values, col_idx, row_ptr = csr.dense_to_csr(weights[name][0])
        total += values.nbytes + col_idx.nbytes + row_ptr.nbytes
    return total


def session(model: onnx.ModelProto, threads: int, sparse: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if sparse:
        kernels.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def iqr(xs):
    q = np.percentile(xs, [25, 75])
    return q[1] - q[0]


def bench_pair(dense, sparse, x, runs: int, warmup: int):
    """Wall-clock ms of alternating runs, and the calling thread's CPU ms (all the work when the
    session has one intra-op thread; unaffected by time spent descheduled on a busy machine)."""
    feed = {"X": x}
    for _ in range(warmup):
        dense.run(None, feed)
        sparse.run(None, feed)
    td, ts, cd, cs = [], [], [], []
    for _ in range(runs):  # alternate so both see the same machine load
        c0, t0 = time.thread_time(), time.perf_counter()
        dense.run(None, feed)
        c1, t1 = time.thread_time(), time.perf_counter()
        sparse.run(None, feed)
        c2, t2 = time.thread_time(), time.perf_counter()
        td.append((t1 - t0) * 1e3)
        ts.append((t2 - t1) * 1e3)
        cd.append((c1 - c0) * 1e3)
        cs.append((c2 - c1) * 1e3)
    return td, ts, cd, cs


def sweep(args) -> int:
    """Dense Gemm vs SparseLinear for one 4096x4096 layer over densities (break-even for exporters)."""
    densities = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((4096, 4096), dtype=np.float32)
    b = np.zeros(4096, np.float32)
    print("| density | batch | threads | dense Gemm ms | SparseLinear ms | speedup (wall) | CPU ms dense / sparse "
          "| speedup (CPU) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in densities:
        w = magnitude_prune(w0, d)
        dense = helper.make_model(helper.make_graph(
            [helper.make_node("Gemm", ["X", "W", "B"], ["Y"], transB=1)], "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4096])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4096])],
            initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]),
            opset_imports=csr.opset_imports(), ir_version=csr.IR_VERSION)
        sparse = csr.make_sparse_linear_model(w, b)
        for threads in args.threads:
            ds, ss = session(dense, threads, False), session(sparse, threads, True)
            for n in args.batches:
                x = rng.standard_normal((n, 4096), dtype=np.float32)
                td, ts, cd, cs = bench_pair(ds, ss, x, args.runs, args.warmup)
                md, ms = statistics.median(td), statistics.median(ts)
                cpu = "n/a | n/a"
                if threads == 1:
                    mcd, mcs = statistics.median(cd), statistics.median(cs)
                    cpu = f"{mcd:.2f} / {mcs:.2f} | {mcd / mcs:.2f}x"
                print(f"| {d:.0%} | {n} | {threads} | {md:.2f} ({iqr(td):.2f}) | {ms:.2f} ({iqr(ts):.2f}) "
                      f"| {md / ms:.2f}x | {cpu} |", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=50, help="timed runs per configuration (default 50)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--configs", nargs="+", default=list(DENSITIES), choices=list(DENSITIES))
    p.add_argument("--bw-gib", type=float, default=1.0, help="array size for the bandwidth measurement (GiB)")
    p.add_argument("--sweep", action="store_true", help="density sweep on one 4096x4096 layer instead")
    args = p.parse_args(argv)

    kernels.library_path()  # build before timing
    if args.sweep:
        return sweep(args)
    isa = os.environ.get("TOOLCHAIN_KERNELS_ISA", "auto")
    print(f"# SparseLinear vs dense Gemm: AlexNet fc6-fc8\n")
    print(f"- CPU: {_cpu_name()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}; "
          f"TOOLCHAIN_KERNELS_ISA={isa}")
    print(f"- {args.runs} timed runs after {args.warmup} warm-up runs; times in ms, median (IQR); "
          f"load average at start {os.getloadavg()[0]:.1f}\n")

    bw = memory_bandwidth(int(args.bw_gib * 1024), 7)
    print(f"- measured read bandwidth (numpy sum over {args.bw_gib:g} GiB, median of 7): {bw / 1e9:.1f} GB/s\n")

    base = make_weights()
    rng = np.random.default_rng(1)
    xs = {n: rng.standard_normal((n, LAYERS[0][1]), dtype=np.float32) for n in args.batches}
    floors = []
    print("| weights | batch | threads | dense Gemm ms | SparseLinear ms | speedup "
          "| CPU ms dense / sparse (1 thread) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cfg in args.configs:
        weights = {name: (magnitude_prune(w, DENSITIES[cfg][name]), b) for name, (w, b) in base.items()}
        dm, sm = dense_model(weights), sparse_model(weights)
        nbytes = sparse_bytes(weights)
        batch1 = {}
        for threads in args.threads:
            ds, ss = session(dm, threads, False), session(sm, threads, True)
            for n in args.batches:
                x = xs[n]
                yd, ys = ds.run(None, {"X": x})[0], ss.run(None, {"X": x})[0]
                err = np.abs(yd - ys).max() / max(np.abs(yd).max(), 1e-12)
                if err > 1e-4:
                    print(f"ERROR: sparse output differs from dense by {err:.2e} (relative)", file=sys.stderr)
                    return 1
                td, ts, cd, cs = bench_pair(ds, ss, x, args.runs, args.warmup)
                md, ms = statistics.median(td), statistics.median(ts)
                cpu = f"{statistics.median(cd):.2f} / {statistics.median(cs):.2f}" if threads == 1 else "n/a"
                print(f"| {cfg} | {n} | {threads} | {md:.2f} ({iqr(td):.2f}) | {ms:.2f} ({iqr(ts):.2f}) "
                      f"| {md / ms:.2f}x | {cpu} |", flush=True)
                if n == 1:
                    batch1[threads] = (ms, statistics.median(cs) if threads == 1 else None)
        floors.append((cfg, nbytes, batch1))

    print("\nBatch-1 bandwidth floor: all sparse weight bytes (values + col_idx + row_ptr) must be read once.\n")
    print("| weights | sparse bytes | floor ms | threads | SparseLinear ms | x floor | CPU ms | CPU x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cfg, nbytes, batch1 in floors:
        floor_ms = nbytes / bw * 1e3
        for threads, (ms, cpu) in batch1.items():
            cpu_cols = f"{cpu:.2f} | {cpu / floor_ms:.2f}" if cpu is not None else "n/a | n/a"
            print(f"| {cfg} | {nbytes / 1e6:.1f} MB | {floor_ms:.2f} | {threads} | {ms:.2f} | {ms / floor_ms:.2f} "
                  f"| {cpu_cols} |")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
