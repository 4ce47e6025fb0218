"""Latency measurement in onnxruntime: medians over many runs, per-layer times from ORT's profiler,
and the memory-bandwidth floor of a model's weights (bytes that must be read / measured bandwidth)."""
from __future__ import annotations

import functools
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import ToolchainError
from .kernels import DOMAIN
from .runtime import make_session, run

MAX_THREADS_PER_CORE = 4  # more threads than this per core only makes onnxruntime spin (100,000 hangs it)


def _cpuinfo(key: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with `key`; None without one (or off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name, printed beside every speed figure."""
    name = _cpuinfo("model name")
    return name if name is not None else (platform.processor() or "unknown CPU")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (avx2, fma, avx512f, ...); empty where /proc/cpuinfo is missing."""
    return set((_cpuinfo("flags") or "").split())


def check_threads(threads: list[int], cpus: int | None = None) -> list[int]:
    """Thread counts for onnxruntime: each in [1, 4 x the machine's CPU count], else a ToolchainError."""
    cpus = cpus or os.cpu_count() or 1
    limit = MAX_THREADS_PER_CORE * cpus
    bad = [t for t in threads if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= limit]
    if bad:
        raise ToolchainError(f"--threads {bad[0]} is out of range: use 1 to {limit} ({MAX_THREADS_PER_CORE} x the "
                             f"{cpus} CPUs of this machine)")
    return list(threads)


def resolve_batches(model: onnx.ModelProto, batches: list[int]) -> tuple[list[int], str | None]:
    """The batch sizes a model can be timed at: a model whose input has a fixed batch size b runs at b only.
    Returns (batches, note): note says what changed (None if nothing did)."""
    inputs = [v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    if not inputs:
        raise ToolchainError("the model has no graph input to feed")
    dims = inputs[0].type.tensor_type.shape.dim
    fixed = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    if fixed is None or list(batches) == [fixed]:
        return list(batches), None
    asked = ",".join(map(str, batches))
    return [fixed], (f"the model's input has a fixed batch size {fixed}: timed at batch {fixed} only "
                     f"(asked for {asked}); re-export it with a dynamic batch dimension for other sizes")


@dataclass
class Timing:
    model: str
    batch: int
    threads: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    per_node_ms: dict[str, float] = field(default_factory=dict)


MAX_FEED_BYTES = 2**31  # random input of a timing run: at most 2 GiB


def _feed(sess, batch: int, seed: int = 0) -> dict:
    """Random input for one run at `batch`; a fixed batch size that differs, or an input too large to
    allocate (declared dimensions of 2^31), is a ToolchainError rather than an onnxruntime traceback."""
    rng = np.random.default_rng(seed)
    inp = sess.get_inputs()[0]
    if isinstance(inp.shape[0], int) and inp.shape[0] > 0 and inp.shape[0] != batch:
        raise ToolchainError(f"the model's input {inp.name!r} has a fixed batch size {inp.shape[0]}: time it with "
                             f"--batch {inp.shape[0]}, or re-export it with a dynamic batch dimension")
    shape = [batch if (not isinstance(d, int) or d <= 0 or i == 0) else d for i, d in enumerate(inp.shape)]
    nbytes = 4 * int(np.prod(shape, dtype=np.float64))
    if nbytes > MAX_FEED_BYTES:
        raise ToolchainError(f"input {inp.name!r} of shape {shape} needs {nbytes / 2**30:.1f} GiB per run; "
                             f"at most {MAX_FEED_BYTES / 2**30:.0f} GiB can be timed")
    return {inp.name: rng.random(shape, dtype=np.float32)}


def time_model(model: onnx.ModelProto, label: str, batch: int, threads: int, min_runs: int = 20,
               min_seconds: float = 1.0, warmup: int = 5) -> Timing:
    check_threads([threads])
    sess = make_session(model, threads=threads)
    feed = _feed(sess, batch)
    for _ in range(warmup):
        run(sess, feed)
    times = []
    t_end = time.perf_counter() + min_seconds
    while len(times) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        run(sess, feed)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10000:
            break
    q25, med, q75 = np.percentile(times, [25, 50, 75])
    return Timing(label, batch, threads, float(med), float(q25), float(q75), len(times))


def per_node_times(model: onnx.ModelProto, batch: int, threads: int, runs: int = 20) -> dict[str, float]:
    """Median kernel time per node (ms) from onnxruntime's profiler."""
    from .runtime import session_options, uses_custom_ops

    check_threads([threads])
    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads, custom_ops=uses_custom_ops(model))
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        sess = make_session(model, threads=threads, session_opts=so)
        feed = _feed(sess, batch)
        for _ in range(3 + runs):
            run(sess, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    per: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            per.setdefault(ev["name"][: -len("_kernel_time")], []).append(ev["dur"] / 1e3)
    return {k: float(np.median(v[3:] if len(v) > 3 else v)) for k, v in per.items()}


@functools.lru_cache(maxsize=None)
def memory_bandwidth(size_mb: int = 1024, repeats: int = 7) -> float:
    """Single-thread read bandwidth in bytes/s (read_bandwidth), measured once per process and argument set."""
    return read_bandwidth(size_mb, repeats)


def read_bandwidth(size_mb: int = 1024, repeats: int = 7) -> float:
    """Measured single-thread read bandwidth in bytes/s over an array far larger than cache, every call anew.

    Three numpy read passes are timed (a float32 sum, an int64 sum and an OR-reduction of the same bytes),
    each the median of `repeats`, and the fastest is returned. One pass alone can be bound by its
    arithmetic rather than by memory: on an AMD EPYC (Zen 4) numpy's float32 sum (pairwise summation)
    read 20-23 GB/s while the integer passes read 27-28 GB/s, so a floor taken from it alone was ~20 %
    too lenient.
    """
    a = np.ones(size_mb * 2**20 // 4, dtype=np.float32)
    passes = (
        lambda: a.sum(),
        lambda: a.view(np.int64).sum(),
        lambda: np.bitwise_or.reduce(a.view(np.uint64)),
    )
    best = 0.0
    for read in passes:
        read()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            read()
            ts.append(time.perf_counter() - t0)
        best = max(best, a.nbytes / float(np.median(ts)))
    return best


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors a forward pass must read: initializers that feed a layer at run time
    (for the portable forms onnxruntime expands them once at load, so the dense size counts)."""
    from .measure import measure

    stats, _ = measure(model)
    total = 0
    for s in stats:
        # custom sparse ops read their stored arrays; everything else reads the dense weight
        total += s.stored_bytes if s.op.startswith(f"{DOMAIN}.") else 4 * s.params
    return total


def format_timings(rows: list[tuple[Timing, Timing | None]], floor_ms: dict[int, float] | None = None) -> str:
    head = "| model | batch | threads | median ms | IQR ms | runs |"
    sep = "|---|---:|---:|---:|---:|---:|"
    with_base = any(b is not None for _, b in rows)
    if with_base:
        head += " dense median ms | speed-up |"
        sep += "---:|---:|"
    if floor_ms:
        head += " bandwidth floor ms | x floor |"
        sep += "---:|---:|"
    lines = [head, sep]
    for t, b in rows:
        line = f"| {t.model} | {t.batch} | {t.threads} | {t.median_ms:.3f} | {t.p25_ms:.3f}-{t.p75_ms:.3f} | {t.runs} |"
        if with_base:
            line += f" {b.median_ms:.3f} | {b.median_ms / t.median_ms:.2f}x |" if b else " | |"
        if floor_ms:
            f = floor_ms.get(t.batch)
            line += f" {f:.3f} | {t.median_ms / f:.2f} |" if f else " | |"
        lines.append(line)
    return "\n".join(lines)
