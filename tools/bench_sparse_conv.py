#!/usr/bin/env python
"""Benchmark SparseConv algorithms on LeNet-5 and AlexNet conv shapes at Han et al.'s densities.

For every layer and batch size: dense onnxruntime Conv, SparseConv with sparse GEMM over im2col
tiles, SparseConv direct (unit stride only), SparseConv with images in lanes (batch) and SparseConv
with the built-in choice (auto). All
variants of one configuration are timed in alternation; prints a markdown table of medians (IQR).

    python tools/bench_sparse_conv.py [--batches 1 8] [--threads 1] [--min-runs 10] [--budget 0.6]
    python tools/bench_sparse_conv.py --sweep   # break-even density on AlexNet conv3 and LeNet-5 conv2
    python tools/bench_sparse_conv.py --max-pool 2 --batches 16 64 --layers lenet5.conv1 reuse25 reuse51 reuse102

--max-pool K fuses a KxK max pool with stride K into the SparseConv (attribute max_pool) and follows the
dense Conv with onnxruntime's MaxPool; the reuseNN layers (5x5 filters on 16x16 inputs at 40% density,
output-channel reuse M x density = NN) place the images-in-lanes algorithm's break-even with im2col.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from toolchain import kernels
from toolchain.methods.prune import csr

# name, C, M, H(=W), kernel, stride, pad, group, density (Han et al. 2015, Table 1 / 4)
LAYERS = [
    ("lenet5.conv1", 1, 20, 28, 5, 1, 0, 1, 0.66),
    ("lenet5.conv2", 20, 50, 12, 5, 1, 0, 1, 0.12),
    ("alexnet.conv1", 3, 96, 227, 11, 4, 0, 1, 0.84),
    ("alexnet.conv2", 96, 256, 27, 5, 1, 2, 2, 0.38),
    ("alexnet.conv3", 256, 384, 13, 3, 1, 1, 1, 0.35),
    ("alexnet.conv4", 384, 384, 13, 3, 1, 1, 2, 0.37),
    ("alexnet.conv5", 384, 256, 13, 3, 1, 1, 2, 0.37),
]
REUSE_LAYERS = [
    ("reuse25", 16, 64, 16, 5, 1, 0, 1, 0.4),
    ("reuse51", 8, 128, 16, 5, 1, 0, 1, 0.4),
    ("reuse102", 8, 256, 16, 5, 1, 0, 1, 0.4),
]


def pruned_weight(rng, m, cg, k, density):
    w = rng.standard_normal((m, cg, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cg * k * k)))
    keep = int(round(density * w.size))
    thresh = np.partition(np.abs(w).ravel(), w.size - keep)[w.size - keep]
    return np.where(np.abs(w) >= thresh, w, np.float32(0)).astype(np.float32)


def dense_conv_model(w, b, stride, pad, group, c, h, pool: int = 0) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["C" if pool else "Y"], kernel_shape=list(w.shape[2:]),
                              strides=[stride] * 2, pads=[pad] * 4, group=group)]
    if pool:
        nodes.append(helper.make_node("MaxPool", ["C"], ["Y"], kernel_shape=[pool] * 2, strides=[pool] * 2))
    graph = helper.make_graph(nodes, "dense_conv",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", c, h, h])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return helper.make_model(graph, opset_imports=csr.opset_imports(), ir_version=csr.IR_VERSION)


def make_session(model, threads, sparse, algo=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # The sessions' runs alternate: a worker left spinning after one session's run would take a CPU from
    # the next session's run (on 2 cores, 2-thread runs measured slower than 1-thread ones, dense Gemm too).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if sparse:
        kernels.register(so)
    old = os.environ.get("TOOLCHAIN_KERNELS_CONV")
    if algo:
        os.environ["TOOLCHAIN_KERNELS_CONV"] = algo
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    finally:
        if old is None:
            os.environ.pop("TOOLCHAIN_KERNELS_CONV", None)
        else:
            os.environ["TOOLCHAIN_KERNELS_CONV"] = old


def time_alternating(sessions: dict, x, min_runs: int, budget_s: float):
    feed = {"X": x}
    for s in sessions.values():
        s.run(None, feed)
        s.run(None, feed)
    times = {k: [] for k in sessions}
    cpu = {k: [] for k in sessions}
    t_end = time.perf_counter() + budget_s
    while min(len(v) for v in times.values()) < min_runs or time.perf_counter() < t_end:
        for k, s in sessions.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            s.run(None, feed)
            times[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.thread_time() - c0) * 1e3)
        if len(times["dense"]) >= 2000:
            break
    return times, cpu


def fmt(ts):
    q = np.percentile(ts, [25, 75])
    return f"{statistics.median(ts):.3f} ({q[1] - q[0]:.3f})"


def sweep(args) -> int:
    kernels.library_path()
    print("| layer | density | batch | dense Conv ms | SparseConv ms | speedup (wall) | CPU ms dense / sparse "
          "| speedup (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(3)
    for name, c, m, h, k, stride, pad, group, _ in LAYERS:
        if name not in ("lenet5.conv2", "alexnet.conv3"):
            continue
        for density in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8):
            w = pruned_weight(rng, m, c // group, k, density)
            b = np.zeros(m, np.float32)
            smodel = csr.make_sparse_conv_model(w, b, input_hw=(h, h), strides=(stride, stride), pads=(pad,) * 4,
                                                group=group)
            sessions = {"dense": make_session(dense_conv_model(w, b, stride, pad, group, c, h), args.threads, False),
                        "sparse": make_session(smodel, args.threads, True)}
            for n in args.batches:
                x = rng.standard_normal((n, c, h, h), dtype=np.float32)
                t, cpu_t = time_alternating(sessions, x, args.min_runs, args.budget)
                cd, cs = statistics.median(cpu_t["dense"]), statistics.median(cpu_t["sparse"])
                cpu = f"{cd:.3f} / {cs:.3f} | {cd / cs:.2f}x" if args.threads == 1 else "n/a | n/a"
                print(f"| {name} | {density:.0%} | {n} | {fmt(t['dense'])} | {fmt(t['sparse'])} | "
                      f"{statistics.median(t['dense']) / statistics.median(t['sparse']):.2f}x | {cpu} |", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-runs", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.6, help="seconds of timing per configuration (at least)")
    p.add_argument("--layers", nargs="+", default=[layer[0] for layer in LAYERS],
                   choices=[layer[0] for layer in LAYERS + REUSE_LAYERS])
    p.add_argument("--max-pool", type=int, default=0, metavar="K", help="fuse a KxK / stride K max pool")
    p.add_argument("--sweep", action="store_true", help="dense Conv vs SparseConv (auto) over densities")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args)

    kernels.library_path()
    print(f"# SparseConv algorithms: wall ms, median (IQR); {args.threads} intra-op thread(s); onnxruntime "
          f"{ort.__version__}; TOOLCHAIN_KERNELS_ISA={os.environ.get('TOOLCHAIN_KERNELS_ISA', 'auto')}; "
          f"load average at start {os.getloadavg()[0]:.1f}"
          + (f"; {args.max_pool}x{args.max_pool} max pool fused (dense: Conv + MaxPool)" if args.max_pool else "") + "\n")
    print("fastest sparse and speedup use CPU-time medians with 1 thread (robust to load), else wall medians.\n")
    print("| layer | density | batch | dense Conv | im2col | direct | batch | auto | CPU ms dense / im2col / direct / "
          "batch / auto | fastest sparse | auto speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    rng = np.random.default_rng(0)
    pool = args.max_pool
    for name, c, m, h, k, stride, pad, group, density in LAYERS + REUSE_LAYERS:
        if name not in args.layers:
            continue
        w = pruned_weight(rng, m, c // group, k, density)
        b = rng.standard_normal(m, dtype=np.float32) * np.float32(0.01)
        smodel = csr.make_sparse_conv_model(w, b, input_hw=(h, h), strides=(stride, stride), pads=(pad,) * 4,
                                            group=group, name=name, max_pool=(pool, pool) if pool else None)
        dmodel = dense_conv_model(w, b, stride, pad, group, c, h, pool)
        sessions = {"dense": make_session(dmodel, args.threads, False),
                    "im2col": make_session(smodel, args.threads, True, "im2col")}
        if stride == 1:
            sessions["direct"] = make_session(smodel, args.threads, True, "direct")
        sessions["batch"] = make_session(smodel, args.threads, True, "batch")
        sessions["auto"] = make_session(smodel, args.threads, True, "auto")
        for n in args.batches:
            x = rng.standard_normal((n, c, h, h), dtype=np.float32)
            ref = sessions["dense"].run(None, {"X": x})[0]
            for key, s in sessions.items():
                y = s.run(None, {"X": x})[0]
                err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)
                if err > 1e-4:
                    print(f"ERROR: {name} {key} differs from dense Conv by {err:.2e}", file=sys.stderr)
                    return 1
            times, cpu = time_alternating(sessions, x, args.min_runs, args.budget)
            med = {key: statistics.median(ts) for key, ts in times.items()}
            # With one intra-op thread all work runs on this thread: CPU time is robust to machine load.
            basis = {key: statistics.median(ts) for key, ts in cpu.items()} if args.threads == 1 else med
            sparse = {key: v for key, v in basis.items() if key in ("im2col", "direct", "batch")}
            best = min(sparse, key=sparse.get)
            cpu_cols = " / ".join(f"{basis[k]:.3f}" for k in ("dense", "im2col", "direct", "batch", "auto") if k in basis)
            print(f"| {name} | {density:.0%} | {n} | {fmt(times['dense'])} | {fmt(times['im2col'])} | "
                  f"{fmt(times['direct']) if 'direct' in times else 'n/a'} | {fmt(times['batch'])} | {fmt(times['auto'])} | "
                  f"{cpu_cols if args.threads == 1 else 'n/a'} | {best} | {basis['dense'] / basis['auto']:.2f}x |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
