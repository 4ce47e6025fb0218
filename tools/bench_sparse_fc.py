#!/usr/bin/env python
"""Benchmark AlexNet's fc stack (9216-4096-4096-1000, ReLU between) pruned by magnitude:
dense onnxruntime (Gemm) vs the SparseLinear custom op, batch 1 and 64, 1 and 2 intra-op threads.

Prints markdown tables: median and IQR per configuration, the speedup measured in the same run
(dense and sparse runs alternate), and the batch-1 bandwidth floor (bytes of the sparse weights /
this machine's measured read bandwidth).

    python tools/bench_sparse_fc.py [--runs 50] [--threads 1 2] [--batches 1 64]
    python tools/bench_sparse_fc.py --sweep [--runs 20]   # break-even density, one 4096x4096 layer
    python tools/bench_sparse_fc.py --deepsparse ~/ds [--reps 5]   # side by side with DeepSparse 1.8
    python tools/bench_sparse_fc.py --linear-paths --batches 1 2 3 4 8 [--runs 40]   # small-batch paths
    python tools/bench_sparse_fc.py --compare-lib OTHER.so --batches 1 2 3 [--runs 400]   # A/B of two builds
    python tools/bench_sparse_fc.py --compare-lib OTHER.so --files A-fast.onnx ... --batches 1 64

--compare-lib OTHER.so: another build of the custom-op library (say, of an earlier commit: `python -m
toolchain.kernels.build --out-dir DIR` in its checkout) against this checkout's, on the fc stack at 90% sparsity
in the three fast forms, every ISA path of this CPU: one session per library, form and path, single runs
alternating in one process, 1 thread; medians of wall and thread CPU time. With --files, those fast-form files
instead of the fc stack (random normal inputs: batch from --batches, the other dimensions from the file).

--deepsparse DS_VENV: the fc stack at 90% sparsity in the fp32 fast form (every ISA path at batch 1, and the
default one with the weights on 4 KiB pages: TOOLCHAIN_KERNELS_HUGEPAGES=0), the
packed fast forms (4-bit codebook, int8), stock onnxruntime on the dense-with-zeros weights, and DeepSparse
(the venv set up as /work/shared/peers/README.md says) on the same weights -- for a packed format, its
dequantized weights as a dense fp32 model with the zeros kept. Every timing runs in its own process, interleaved
--reps times so machine noise hits all alike; one thread; medians. Each output is checked against a float64 numpy
reference of the weights that backend was given (DeepSparse 1.8 computes wrong outputs for some shapes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


ENGINE_TIMING = __import__("pathlib").Path(__file__).resolve().parent / "engine_timing.py"  # one timing per process
LAYERS = [("fc6", 9216, 4096), ("fc7", 4096, 4096), ("fc8", 4096, 1000)]

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from toolchain import kernels  # noqa: E402
from toolchain.bench import cpu_flags, cpu_name, memory_bandwidth, read_bandwidth  # noqa: E402
from toolchain.methods.prune import csr
from toolchain.methods.quantize import packed  # noqa: E402
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


def session(model: onnx.ModelProto, threads: int, sparse: bool, lib: str | None = None,
            env: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session for alternating timings; sparse: with the custom ops of `lib` (default: this checkout's
    library). `env` (TOOLCHAIN_KERNELS_ISA, _LINEAR, ...) is set while the session creates its kernels, which
    read it then, and restored afterwards."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # The sessions' runs alternate: a worker left spinning after one session's run would take a CPU from
    # the next session's run (on 2 cores, 2-thread runs measured slower than 1-thread ones, dense Gemm too).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if sparse and lib:
        so.register_custom_ops_library(lib)
    elif sparse:
        kernels.register(so)
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cache_resident_rates(isas, reps: int = 5, rows: int = 150, seconds: float = 0.3) -> dict[str, float]:
    """Batch-1 ns per kept weight of the fp32 kernel with its weights in L2: one 9216-column layer at 10%
    (`rows` rows, about 0.8 MB), timed against a 1-row layer of the same width so that the fixed costs of a
    run (onnxruntime's call, the scan of X) cancel; ISA paths interleaved `reps` times, medians."""
    rng = np.random.default_rng(3)
    k = LAYERS[0][1]
    big = magnitude_prune(rng.standard_normal((rows, k), dtype=np.float32), 0.10)
    small = magnitude_prune(rng.standard_normal((1, k), dtype=np.float32), 0.10)
    extra = int(np.count_nonzero(big)) - int(np.count_nonzero(small))
    x = rng.standard_normal((1, k), dtype=np.float32)
    sessions = {isa: [session(csr.make_sparse_linear_model(w, None), 1, True, env={"TOOLCHAIN_KERNELS_ISA": isa})
                      for w in (big, small)] for isa in isas}

    def median_run(sess) -> float:
        for _ in range(20):
            sess.run(None, {"X": x})
        ts, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            sess.run(None, {"X": x})
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rates: dict[str, list[float]] = {isa: [] for isa in isas}
    for _ in range(reps):
        for isa, (sb, ss) in sessions.items():
            rates[isa].append((median_run(sb) - median_run(ss)) / extra * 1e9)
    return {isa: statistics.median(r) for isa, r in rates.items()}


def iqr(xs):
    q = np.percentile(xs, [25, 75])
    return q[1] - q[0]


def time_alternating(sessions: dict, feed: dict, runs: int, warmup: int) -> tuple[dict, dict]:
    """Wall-clock ms of single runs of each session, the sessions alternating so all see the same machine
    load, and the calling thread's CPU ms (all the work when a session has one intra-op thread; unaffected by
    time spent descheduled on a busy machine). Returns ({key: wall ms}, {key: CPU ms})."""
    for _ in range(warmup):
        for sess in sessions.values():
            sess.run(None, feed)
    wall = {key: [] for key in sessions}
    cpu = {key: [] for key in sessions}
    for _ in range(runs):
        for key, sess in sessions.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            sess.run(None, feed)
            cpu[key].append((time.thread_time() - c0) * 1e3)
            wall[key].append((time.perf_counter() - t0) * 1e3)
    return wall, cpu


def bench_pair(dense, sparse, x, runs: int, warmup: int):
    """time_alternating for a dense and a sparse session: wall dense, wall sparse, CPU dense, CPU sparse."""
    wall, cpu = time_alternating({"dense": dense, "sparse": sparse}, {"X": x}, runs, warmup)
    return wall["dense"], wall["sparse"], cpu["dense"], cpu["sparse"]


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


def kmeans_codebook(values: np.ndarray, k: int = 16, iters: int = 20) -> np.ndarray:
    """1-D k-means with linear initialisation (Han et al.'s weight sharing) over the kept weights."""
    v = np.sort(values.astype(np.float64))
    c = np.linspace(v[0], v[-1], k)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
        cnt = np.bincount(idx, minlength=k)
        c = np.where(cnt > 0, np.bincount(idx, weights=v, minlength=k) / np.maximum(cnt, 1), c)
    return c.astype(np.float32)


def packed_layers(weights, fmt: str) -> dict:
    """name -> packed layout of each pruned layer (fmt: cb4 = 4-bit codebook, 16 k-means values; int8)."""
    out = {}
    for name, _, _ in LAYERS:
        w = weights[name][0]
        out[name] = (packed.encode_codebook(w, kmeans_codebook(w[w != 0]), 4) if fmt == "cb4"
                     else packed.encode_int8(w))
    return out


def packed_model(layers: dict, weights) -> onnx.ModelProto:
    nodes, inits, x = [], [], "X"
    for i, (name, _, _) in enumerate(LAYERS):
        y = "Y" if i == len(LAYERS) - 1 else f"{name}.out"
        node, tensors = packed.packed_linear_node(x, y, layers[name], weights[name][1], name=name)
        nodes.append(node)
        inits += tensors
        if i < len(LAYERS) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{name}.relu"]))
            y = f"{name}.relu"
        x = y
    return _graph(nodes, inits, "fc_packed")


def reference(weights, x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for i, (name, _, _) in enumerate(LAYERS):
        w, b = weights[name]
        h = h @ w.astype(np.float64).T + b
        if i < len(LAYERS) - 1:
            h = np.maximum(h, 0)
    return h


def sidebyside(args) -> int:
    from pathlib import Path

    ds_python = Path(args.deepsparse).expanduser() / "bin" / "python"
    if not ds_python.exists():
        print(f"ERROR: {ds_python} not found; set up DeepSparse as /work/shared/peers/README.md says", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lib = str(kernels.library_path())
    base = make_weights()
    fp32 = {name: (magnitude_prune(w, 0.10), b) for name, (w, b) in base.items()}
    layers = {fmt: packed_layers(fp32, fmt) for fmt in ("cb4", "int8")}
    given = {"fp32": fp32}  # the weights each backend computes with (packed: dequantized, zeros kept)
    for fmt, lay in layers.items():
        given[fmt] = {name: (packed.decode(lay[name]), fp32[name][1]) for name, _, _ in LAYERS}
    files = {}
    for fmt in ("fp32", "cb4", "int8"):
        files[f"{fmt}_dense"] = work / f"{fmt}_dense.onnx"
        files[f"{fmt}_fast"] = work / f"{fmt}_fast.onnx"
        onnx.save(dense_model(given[fmt]), files[f"{fmt}_dense"])
        onnx.save(sparse_model(fp32) if fmt == "fp32" else packed_model(layers[fmt], fp32), files[f"{fmt}_fast"])

    isas = ["portable", "avx2", "avx512"]
    # label, backend, model, weights, ISA, batches
    # label, backend, model, weights, environment of the timing process, batches
    configs = [("onnxruntime dense Gemm", "ort", "fp32_dense", "fp32", None, args.batches)]
    configs += [(f"fast fp32 CSR [{isa}]", "ort", "fp32_fast", "fp32", {"TOOLCHAIN_KERNELS_ISA": isa}, [1])
                for isa in isas]
    configs += [("fast fp32 CSR [auto, 4 KiB pages]", "ort", "fp32_fast", "fp32", {"TOOLCHAIN_KERNELS_HUGEPAGES": "0"},
                 [1])]
    configs += [("fast fp32 CSR [auto]", "ort", "fp32_fast", "fp32", None, [b for b in args.batches if b != 1]),
                ("fast codebook 4-bit [auto]", "ort", "cb4_fast", "cb4", None, args.batches),
                ("fast int8 [auto]", "ort", "int8_fast", "int8", None, args.batches),
                ("DeepSparse fp32", "ds", "fp32_dense", "fp32", None, args.batches),
                ("DeepSparse codebook-4 dequantized", "ds", "cb4_dense", "cb4", None, args.batches),
                ("DeepSparse int8 dequantized", "ds", "int8_dense", "int8", None, args.batches)]

    print("# AlexNet fc6-fc8 (9216-4096-4096-1000) at 90% sparsity: side by side with DeepSparse\n")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}; DeepSparse from "
          f"{args.deepsparse}; 1 thread; load average at start {os.getloadavg()[0]:.1f}")
    print(f"- {args.reps} interleaved repetitions, each timing in its own process ({args.budget:g} s of runs, median); "
          "table: median over repetitions; CPU = the timing thread's CPU time (DeepSparse: its process's)")

    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    errs: dict[tuple[str, int], float] = {}
    # The floor is measured at the start of every repetition: other tenants of the host change the bandwidth
    # one core gets within minutes (15 to 29 GB/s in one session), so a floor from the start of the run alone
    # can be far from the one the later timings ran against.
    bws: list[float] = []
    for rep in range(args.reps):
        bws.append(read_bandwidth(int(args.bw_gib * 1024), 3))  # not memory_bandwidth: that one is cached
        for batch in args.batches:
            for label, backend, model, wkey, extra_env, batches in configs:
                if batch not in batches:
                    continue
                env = dict(os.environ)
                env.pop("TOOLCHAIN_KERNELS_ISA", None)
                env.pop("TOOLCHAIN_KERNELS_HUGEPAGES", None)
                env.update(extra_env or {})
                out = work / f"out_{abs(hash(label))}_{batch}.npy"
                cmd = [str(ds_python) if backend == "ds" else sys.executable, str(ENGINE_TIMING), backend,
                       str(files[model]), str(batch), "--shape", str(LAYERS[0][1]), "--normal",
                       "--budget", str(args.budget)]
                if backend == "ort" and model.endswith("_fast"):
                    cmd += ["--lib", lib]
                if rep == 0:
                    cmd += ["--out", str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"ERROR: {label} batch {batch}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    return 1
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                times.setdefault((label, batch), []).append((r["ms"], r["cpu_ms"]))
                if rep == 0:
                    x = np.random.default_rng(1).standard_normal((batch, LAYERS[0][1])).astype(np.float32)
                    ref = reference(given[wkey], x)
                    y = np.load(out)
                    errs[(label, batch)] = float(np.abs(y - ref).max() / np.abs(ref).max())
                    out.unlink()
        print(f"  (repetition {rep + 1}/{args.reps} done)", file=sys.stderr, flush=True)
    bw = statistics.median(bws)
    print(f"- read bandwidth at the start of each repetition (fastest of three numpy read passes over "
          f"{args.bw_gib:g} GiB, median of 3 each): {', '.join(f'{b / 1e9:.1f}' for b in bws)} GB/s; median "
          f"{bw / 1e9:.1f}\n")

    def med(label, batch, i=0):
        return statistics.median(t[i] for t in times[(label, batch)])

    def med_x_floor(label, i=0):  # median over repetitions of (batch-1 time / that repetition's floor)
        return statistics.median(t[i] / (csr_bytes / b * 1e3) for t, b in zip(times[(label, 1)], bws))

    ds_same = {"fp32": "DeepSparse fp32", "cb4": "DeepSparse codebook-4 dequantized",
               "int8": "DeepSparse int8 dequantized"}
    print("| engine / form | weights | batch | wall ms | CPU ms | speedup vs DeepSparse, same weights (wall) "
          "| vs DeepSparse fp32 (wall) | max rel. output error |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for label, backend, model, wkey, _, batches in configs:
            if batch not in batches:
                continue
            ms, cpu = med(label, batch), med(label, batch, 1)
            same = med(ds_same[wkey], batch) / ms
            vs32 = med("DeepSparse fp32", batch) / ms
            print(f"| {label} | {wkey} | {batch} | {ms:.2f} | {cpu:.2f} | {same:.2f}x | {vs32:.2f}x "
                  f"| {errs[(label, batch)]:.1e} |")

    print("\nStorage (bytes of the weight tensors in the file; kept weight = non-zero of the pruned fp32 layer):\n")
    print("| format | bytes | kept weights | bytes per kept weight | filler entries |")
    print("|---|---:|---:|---:|---:|")
    kept = sum(int(np.count_nonzero(fp32[n][0])) for n, _, _ in LAYERS)
    csr_bytes = sparse_bytes(fp32)
    print(f"| fp32 CSR (SparseLinear, uint16 col_idx) | {csr_bytes:,} | {kept:,} | {csr_bytes / kept:.2f} | 0 |")
    for fmt, name in (("cb4", "codebook 4-bit (SparseLinearCodebook)"), ("int8", "int8 (SparseLinearInt8)")):
        nb = sum(lay.nbytes() for lay in layers[fmt].values())
        fill = sum(lay.fillers for lay in layers[fmt].values())
        print(f"| {name} | {nb:,} | {kept:,} | {nb / kept:.2f} | {fill} |")

    print("\nBatch-1 bandwidth floor of the fp32 fast form: its CSR bytes / the bandwidth measured at the start of "
          "the same repetition; x floor = median over repetitions of time / floor (floor ms: the median floor).\n")
    floor = csr_bytes / bw * 1e3
    print("| ISA path | floor ms | wall ms | x floor | CPU ms | CPU x floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for isa in [*isas, "auto, 4 KiB pages"]:  # the last: TOOLCHAIN_KERNELS_HUGEPAGES=0
        label = f"fast fp32 CSR [{isa}]"
        ms, cpu = med(label, 1), med(label, 1, 1)
        print(f"| {isa} | {floor:.2f} | {ms:.2f} | {med_x_floor(label):.2f} | {cpu:.2f} | {med_x_floor(label, 1):.2f} |")

    print("\nBatch-1 fp32 time per kept weight: streamed (the stack above, wall), with the weights in L2 (one "
          "150 x 9216 layer at 10%, less a 1-row layer's time), and the floor (CSR bytes per kept weight / "
          "bandwidth).\n")
    resident = cache_resident_rates(isas)
    floor_ns = csr_bytes / kept / bw * 1e9
    print("| ISA path | streamed ns | L2-resident ns | floor ns | L2-resident x floor |")
    print("|---|---:|---:|---:|---:|")
    for isa in isas:
        streamed = med(f"fast fp32 CSR [{isa}]", 1) / kept * 1e6
        print(f"| {isa} | {streamed:.3f} | {resident[isa]:.3f} | {floor_ns:.3f} | {resident[isa] / floor_ns:.2f} |")
    return 0


def linear_paths(args) -> int:
    """Small batches: the tile product against one batch-1 product per row of X (TOOLCHAIN_KERNELS_LINEAR=tile
    / rowwise), fp32 and packed fast forms of the fc stack at 90 % sparsity, 1 thread, runs interleaved."""
    base = make_weights()
    fp32 = {name: (magnitude_prune(w, 0.10), b) for name, (w, b) in base.items()}
    forms = {"fp32": sparse_model(fp32)}
    for fmt in ("cb4", "int8"):
        forms[fmt] = packed_model(packed_layers(fp32, fmt), fp32)
    rng = np.random.default_rng(2)
    print("# Small batches: tile product vs one batch-1 product per row (AlexNet fc6-fc8, 90% sparse)\n")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}; 1 thread; "
          f"{args.runs} interleaved runs, medians; load average at start {os.getloadavg()[0]:.1f}\n")
    print("| form | batch | tile ms | rowwise ms | rowwise speed-up | auto takes |")
    print("|---|---:|---:|---:|---:|---|")
    for form, model in forms.items():
        sessions = {path: session(model, 1, True, env={"TOOLCHAIN_KERNELS_LINEAR": path})
                    for path in ("tile", "rowwise", "auto")}
        auto_sess = sessions.pop("auto")
        for n in args.batches:
            x = rng.standard_normal((n, LAYERS[0][1]), dtype=np.float32)
            feed = {"X": x}
            ref = sessions["tile"].run(None, feed)[0]
            got = sessions["rowwise"].run(None, feed)[0]
            err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)
            if err > 1e-4:
                print(f"ERROR: the two paths differ by {err:.2e} (relative) at batch {n}", file=sys.stderr)
                return 1
            ts, _ = time_alternating(sessions, feed, args.runs, args.warmup)
            mt, mr = statistics.median(ts["tile"]), statistics.median(ts["rowwise"])
            # which path the default takes: the one whose output it reproduces bit for bit
            y_auto = auto_sess.run(None, feed)[0]
            auto = ("rowwise" if np.array_equal(y_auto, got) else "tile" if np.array_equal(y_auto, ref)
                    else "neither (bitwise)")
            print(f"| {form} | {n} | {mt:.2f} | {mr:.2f} | {mt / mr:.2f}x | {auto} |", flush=True)
    return 0


def compare_lib(args) -> int:
    """A/B of two builds of the custom-op library (see the module docstring)."""
    from pathlib import Path

    other = Path(args.compare_lib).expanduser().resolve()
    if not other.is_file():
        print(f"ERROR: {other} is not a file (build one with python -m toolchain.kernels.build --out-dir DIR)",
              file=sys.stderr)
        return 2
    libs = {"other": str(other), "this": str(kernels.library_path())}
    missing = [f for f in args.files or [] if not Path(f).is_file()]
    if missing:
        print(f"ERROR: {missing[0]} is not a file", file=sys.stderr)
        return 2
    if args.files:  # fast-form files of the user's choice instead of the fc stack
        forms = {Path(f).name: onnx.load(f) for f in args.files}
    else:
        base = make_weights()
        fp32 = {name: (magnitude_prune(w, 0.10), b) for name, (w, b) in base.items()}
        forms = {"fp32": sparse_model(fp32)}
        for fmt in ("cb4", "int8"):
            forms[fmt] = packed_model(packed_layers(fp32, fmt), fp32)
    flags = cpu_flags()
    isas = ["portable"] + (["avx2"] if {"avx2", "fma"} <= flags else [])
    isas += ["avx512"] if {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"} <= flags else []
    rng = np.random.default_rng(2)
    what = ", ".join(forms) if args.files else "AlexNet fc6-fc8 at 90% sparsity"
    print(f"# Two builds of the custom-op library: {what}\n")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}; 1 thread; "
          f"{args.runs} alternating runs per session, medians; load average at start {os.getloadavg()[0]:.1f}")
    print(f"- other: {other}\n- this: {libs['this']}\n")
    print("| form | ISA path | batch | other ms | this ms | speed-up | CPU ms other / this | max rel. difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for form, model in forms.items():
        sessions = {(isa, name): session(model, 1, True, lib=lib, env={"TOOLCHAIN_KERNELS_ISA": isa})
                    for isa in isas for name, lib in libs.items()}
        inp = next(iter(sessions.values())).get_inputs()[0]
        for n in args.batches:  # the first input, batch n, its other dimensions from the file
            shape = [n] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
            feed = {inp.name: rng.standard_normal(shape, dtype=np.float32)}
            outs = {key: sess.run(None, feed)[0] for key, sess in sessions.items()}
            wall, cpu = time_alternating(sessions, feed, args.runs, args.warmup)
            for isa in isas:
                a, b = (isa, "other"), (isa, "this")
                ma, mb = statistics.median(wall[a]), statistics.median(wall[b])
                diff = np.abs(outs[a] - outs[b]).max() / max(np.abs(outs[a]).max(), 1e-12)
                print(f"| {form} | {isa} | {n} | {ma:.4g} | {mb:.4g} | {ma / mb:.2f}x | "
                      f"{statistics.median(cpu[a]):.4g} / {statistics.median(cpu[b]):.4g} | {diff:.1e} |", flush=True)
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
    p.add_argument("--deepsparse", metavar="DS_VENV", help="side by side with DeepSparse (its venv) instead")
    p.add_argument("--reps", type=int, default=5, help="--deepsparse: interleaved repetitions (default 5)")
    p.add_argument("--budget", type=float, default=2.0, help="--deepsparse: seconds of runs per timing (default 2)")
    p.add_argument("--work", default="/tmp/bench-sbs", help="--deepsparse: folder for the model files")
    p.add_argument("--linear-paths", action="store_true",
                   help="small batches: tile product vs one batch-1 product per row (use with --batches 1 2 3 4 8)")
    p.add_argument("--compare-lib", metavar="OTHER_SO", help="A/B against another build of the custom-op library")
    p.add_argument("--files", nargs="+", metavar="FAST_ONNX",
                   help="--compare-lib: time these fast-form files (first input, batch from --batches) instead")
    args = p.parse_args(argv)

    kernels.library_path()  # build before timing
    if args.sweep:
        return sweep(args)
    if args.deepsparse:
        return sidebyside(args)
    if args.linear_paths:
        return linear_paths(args)
    if args.compare_lib:
        return compare_lib(args)
    isa = os.environ.get("TOOLCHAIN_KERNELS_ISA", "auto")
    print(f"# SparseLinear vs dense Gemm: AlexNet fc6-fc8\n")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}; "
          f"TOOLCHAIN_KERNELS_ISA={isa}")
    print(f"- {args.runs} timed runs after {args.warmup} warm-up runs; times in ms, median (IQR); "
          f"load average at start {os.getloadavg()[0]:.1f}\n")

    bw = memory_bandwidth(int(args.bw_gib * 1024), 7)
    print(f"- measured read bandwidth (fastest of three numpy read passes over {args.bw_gib:g} GiB, median of 7 each): {bw / 1e9:.1f} GB/s\n")

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


if __name__ == "__main__":
    sys.exit(main())
