"""toolchain bench MODEL.onnx — latency in onnxruntime (median, IQR), per layer, vs a dense baseline."""
from pathlib import Path

NAME = "bench"
HELP = "benchmark inference latency in onnxruntime (vs a dense baseline, with the bandwidth floor)"
EXAMPLE = """example:
  toolchain bench out/lenet-300-100-pruned-fast.onnx --baseline models/lenet-300-100/lenet-300-100.onnx --batch 1,64"""


def _ints(text: str, what: str) -> list[int]:
    from toolchain import ToolchainError

    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ToolchainError(f"--{what} must be comma-separated integers, not {text!r}") from None
    if any(v < 1 for v in vals):
        raise ToolchainError(f"--{what} values must be >= 1")
    return vals


def add_arguments(p):
    p.add_argument("model", help="ONNX model to time")
    p.add_argument("--baseline", metavar="DENSE.onnx", help="dense original, timed in the same run")
    p.add_argument("--batch", default="1,64", help="batch sizes (default 1,64)")
    p.add_argument("--threads", default="1", help="onnxruntime intra-op thread counts (default 1)")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum timing time per configuration")
    p.add_argument("--per-layer", action="store_true", help="also print per-node kernel times (ORT profiler)")
    p.add_argument("--png", default=None, help="write a bar chart of the medians")


def run(args) -> int:
    from toolchain import read_onnx
    from toolchain.bench import (check_threads, format_timings, memory_bandwidth, per_node_times, resolve_batches,
                                 time_model, weight_bytes)

    model = read_onnx(args.model)
    base = read_onnx(args.baseline) if args.baseline else None
    batches, threads = _ints(args.batch, "batch"), check_threads(_ints(args.threads, "threads"))
    batches, note = resolve_batches(model, batches)  # a model with a fixed batch size is timed at it
    if base is not None:
        batches, base_note = resolve_batches(base, batches)
        note = note or base_note
    if note:
        print(note)
    rows = []
    for th in threads:
        for b in batches:
            t = time_model(model, Path(args.model).name, b, th, min_seconds=args.seconds)
            tb = time_model(base, Path(args.baseline).name, b, th, min_seconds=args.seconds) if base else None
            rows.append((t, tb))
    bw = memory_bandwidth()
    floor = {b: weight_bytes(model) / bw * 1e3 for b in batches}
    print(format_timings(rows, floor))
    print(f"\nweights read per inference: {weight_bytes(model):,} bytes; measured memory bandwidth "
          f"{bw / 1e9:.1f} GB/s -> floor {floor[batches[0]]:.3f} ms (the time to stream the weights once)")
    if args.per_layer:
        for th in threads:
            for b in batches:
                per = per_node_times(model, b, th)
                per_b = per_node_times(base, b, th) if base else {}
                print(f"\nper-node kernel time, batch {b}, {th} thread(s) (median ms):")
                print("| node | ms |" + (" dense ms |" if base else ""))
                print("|---|---:|" + ("---:|" if base else ""))
                for k in sorted(set(per) | set(per_b), key=lambda k: -max(per.get(k, 0), per_b.get(k, 0))):
                    cells = [f"{per[k]:.3f}" if k in per else ""] + ([f"{per_b[k]:.3f}" if k in per_b else ""] if base else [])
                    print(f"| {k} | " + " | ".join(cells) + " |")
    if args.png:
        from toolchain.plots import latency_plot

        print(f"wrote {latency_plot(rows, args.png)}")
    return 0
