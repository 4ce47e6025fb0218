"""One timing of one ONNX model in one engine, in this process: what the side-by-side benchmarks run for
every (engine, model, batch), each in a fresh process, interleaved (tools/bench_sparse_fc.py --deepsparse,
tools/bench_models.py --deepsparse). It imports no toolchain module, so DeepSparse's own python runs it.

    python tools/engine_timing.py ort|ds MODEL.onnx BATCH --shape 9216 [--normal] [--lib LIB.so]
                                  [--budget 2] [--out first_output.npy]

Prints one JSON line: median wall ms, median CPU ms (the timing thread's; DeepSparse: its process's), runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backend", choices=["ort", "ds"])
    p.add_argument("model")
    p.add_argument("batch", type=int)
    p.add_argument("--shape", required=True, help="one sample's input shape, comma-separated")
    p.add_argument("--normal", action="store_true", help="standard-normal input (default: uniform [0, 1))")
    p.add_argument("--lib", help="custom-op library to register (onnxruntime)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs (at least 10 runs)")
    p.add_argument("--out", help="save the first output here (.npy)")
    a = p.parse_args(argv)
    rng = np.random.default_rng(1)
    shape = (a.batch, *map(int, a.shape.split(",")))
    x = (rng.standard_normal(shape) if a.normal else rng.random(shape)).astype(np.float32)
    clock = time.thread_time
    if a.backend == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        if a.lib:
            so.register_custom_ops_library(a.lib)
        sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        fn = lambda: sess.run(None, {name: x})  # noqa: E731
    else:
        os.environ["NM_DISABLE_ANALYTICS"] = "1"
        from deepsparse import Engine

        engine = Engine(a.model, batch_size=a.batch, num_cores=1)
        fn = lambda: engine.run([x])  # noqa: E731
        clock = time.process_time  # DeepSparse computes on its own thread
    out = fn()[0]
    if a.out:
        np.save(a.out, out)
    for _ in range(3):
        fn()
    wall, cpu = [], []
    end = time.perf_counter() + a.budget
    while len(wall) < 10 or time.perf_counter() < end:
        c0, t0 = clock(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((clock() - c0) * 1e3)
    print(json.dumps({"ms": float(np.median(wall)), "cpu_ms": float(np.median(cpu)), "runs": len(wall)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
