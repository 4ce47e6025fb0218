#!/usr/bin/env python
"""Reproduce Deep Compression (Han, Mao, Dally, ICLR 2016) on the shipped LeNets, and P+Q on AlexNet.

LeNets: from a shipped pruned file (START below: LeNet-5's Han et al. 2015 pruned file, LeNet-300-100's
record-sparsity file), run models/NAME/deep-compression.toml (further pruning where it says so, then
trained weight sharing)
retraining on the first 50,000 MNIST training images; the other 10,000 (the data package's
validation split) are the held-out set every choice (bits, epochs, lr) was made on. Writes
models/NAME/NAME-deep-compression.onnx (portable form: stock onnxruntime) and, for the int8 route,
evaluates the pruned network with per-channel int8 weights (QDQ). Prints the paper's Tables 2/3
layout per model and Table 1 beside ours. `--test` reads the test set (once, for the report).

    python tools/reproduce_deep_compression.py --test                  # both LeNets (a few minutes, 1 thread)
    python tools/reproduce_deep_compression.py --models lenet-5 --out out/dc
    python tools/reproduce_deep_compression.py --models alexnet         # AlexNet own init, no retraining: P+Q
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import toolchain  # noqa: E402
from toolchain.methods import quantize  # noqa: E402

import_onnx = toolchain.load
_Shared, int8_from_dense = quantize.layers._Shared, quantize.layers.int8_from_dense
export_quantized, import_quantized = quantize.onnx.export_quantized, quantize.onnx.import_quantized
format_table, layer_report, totals = quantize.report.format_table, quantize.report.layer_report, quantize.report.totals


CPU = "AMD EPYC Zen 4 (AVX2, FMA, AVX-512 F/BW/VL/VNNI/BF16), 1 onnxruntime thread"
PAPER = {  # Deep Compression Table 1 and Tables 2/3/4 totals
    "lenet-300-100": {"error": "1.64% -> 1.58%", "P": "12x", "P+Q": "32x", "P+Q+H": "40x", "size": "1070 KB -> 27 KB"},
    "lenet-5": {"error": "0.80% -> 0.74%", "P": "12x", "P+Q": "39x", "P+Q+H": "49x", "size": "1720 KB -> 44 KB"},
    "alexnet": {"error": "42.78% -> 42.78%", "P": "9x", "P+Q": "27x", "P+Q+H": "35x", "size": "240 MB -> 6.9 MB"},
}
VAL = 10000
# The file each LeNet's deep-compression.toml starts from (its header says why).
START = {"lenet-300-100": "lenet-300-100-pruned-record.onnx", "lenet-5": "lenet-5-pruned.onnx"}


def mnist_splits():
    from toolchain.data import load_mnist

    d = load_mnist()
    n = len(d.train_x) - VAL
    return d.train_x[:n], d.train_y[:n], d.train_x[n:], d.train_y[n:], d.test_x, d.test_y


def ort_session(path_or_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def ort_error(path, x, y, batch=500) -> float:
    sess = ort_session(str(path))
    name = sess.get_inputs()[0].name
    wrong = 0
    for i in range(0, len(x), batch):
        wrong += int((sess.run(None, {name: x[i:i + batch]})[0].argmax(1) != y[i:i + batch]).sum())
    return wrong / len(x)


def timing(path, x) -> tuple[float, float]:
    """(session start ms, median steady-state ms per batch-1 inference) in onnxruntime, 1 thread."""
    starts = []
    for _ in range(5):
        t = time.perf_counter()
        sess = ort_session(str(path))
        starts.append((time.perf_counter() - t) * 1e3)
    name, xb = sess.get_inputs()[0].name, x[:1]
    for _ in range(50):
        sess.run(None, {name: xb})
    runs = []
    for _ in range(500):
        t = time.perf_counter()
        sess.run(None, {name: xb})
        runs.append((time.perf_counter() - t) * 1e3)
    return float(np.median(starts)), float(np.median(runs))


def lenet(name: str, args, splits) -> dict:
    tx, ty, vx, vy, sx, sy = splits
    folder = ROOT / "models" / name
    dense_file, pruned_file = folder / f"{name}.onnx", folder / f"{name}-pruned.onnx"
    start_file = folder / START[name]
    out_dir = Path(args.out) if args.out else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"{name}-deep-compression.onnx"
    recipe_path = Path(args.recipe or folder / "deep-compression.toml")
    dense_net, net = import_onnx(dense_file), import_onnx(start_file)
    totals_dense = {n: int(m.weight.numel()) for n, m in dense_net.layers().items()}
    t0 = time.time()
    res = toolchain.compress(net, recipe_path, (tx, ty, vx, vy), progress=False, baseline=dense_file)
    minutes = (time.time() - t0) / 60
    for line in res.lines:
        print(f"  {name}: {line}")
    net = res.network.eval()
    export_quantized(net, out_file)
    graph_bytes = out_file.stat().st_size  # before the toolchain's records (recipe, error, baseline)
    back = import_quantized(out_file)  # the file re-imports as weight-sharing layers
    assert all(isinstance(back.layers()[n], _Shared) for n, m in net.layers().items() if isinstance(m, _Shared))
    rows = [layer_report(n, m, totals_dense[n]) for n, m in net.layers().items() if isinstance(m, _Shared)]
    # int8 route: the shipped pruned network with per-channel int8 weights, no retraining
    i8 = import_onnx(pruned_file)
    for n, m in list(i8.layers().items()):
        i8.replace_layer(n, int8_from_dense(m))
    i8_file = out_dir / f"{name}-pruned-int8.onnx" if args.keep_int8 else Path(tempfile.mkstemp(suffix=".onnx")[1])
    export_quantized(i8.eval(), i8_file)
    # onnxruntime's own dynamic int8 quantization, applied to our `dense` form of the pruned network
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dense_form = Path(tempfile.mkstemp(suffix=".onnx")[1])
    dyn = Path(tempfile.mkstemp(suffix=".onnx")[1])
    export_quantized(import_onnx(pruned_file).eval(), dense_form, form="dense")
    quantize_dynamic(str(dense_form), str(dyn), weight_type=QuantType.QInt8)
    r = {"name": name, "rows": rows, "graph_bytes": graph_bytes, "dense_form_bytes": dense_form.stat().st_size, "dyn_bytes": dyn.stat().st_size, "minutes": minutes, "val_before": res.error_before, "file": out_file,
         "dense_bytes": dense_file.stat().st_size, "pruned_bytes": pruned_file.stat().st_size,
         "bytes": out_file.stat().st_size, "i8_bytes": i8_file.stat().st_size,
         "val": {"pruned": ort_error(pruned_file, vx, vy), "dc": ort_error(out_file, vx, vy),
                 "int8": ort_error(i8_file, vx, vy), "dense": ort_error(dense_file, vx, vy),
                 "dyn": ort_error(dyn, vx, vy)}}
    if args.test:
        r["test"] = {"dense": ort_error(dense_file, sx, sy), "pruned": ort_error(pruned_file, sx, sy),
                     "dc": ort_error(out_file, sx, sy), "int8": ort_error(i8_file, sx, sy),
                     "dyn": ort_error(dyn, sx, sy)}
        # the records every shipped file carries (tools/record_metadata.py --check)
        toolchain.set_metadata(out_file, recipe=toolchain.Recipe.load(recipe_path).source,
                               test_error=r["test"]["dc"], baseline=dense_file)
        r["bytes"] = out_file.stat().st_size
    if args.timing:
        r["timing"] = {k: timing(f, vx) for k, f in (("dense", dense_file), ("pruned", pruned_file),
                                                       ("dc", out_file), ("int8", i8_file))}
    if not args.keep_int8:
        os.unlink(i8_file)
    os.unlink(dense_form)
    os.unlink(dyn)
    return r


def alexnet(args) -> dict:
    """AlexNet with its own seeded init (no ImageNet here): prune to Han et al.'s densities, then
    weight sharing with 8-bit conv / 5-bit fc codebooks, no retraining; the file size is measured."""
    from toolchain.zoo import get_model_spec

    spec = get_model_spec("alexnet")
    with tempfile.TemporaryDirectory() as tmp:
        dense_file = Path(tmp) / "alexnet.onnx"
        from toolchain.cli import main as toolchain_main

        if toolchain_main(["zoo", "export", "alexnet", "-o", str(dense_file)]):
            raise SystemExit("zoo export failed")
        dense_bytes = dense_file.stat().st_size
        net = import_onnx(dense_file)
        del dense_file
        totals_dense = {n: int(m.weight.numel()) for n, m in net.layers().items()}
        text = (spec.folder / "prune.toml").read_text() + """
[[stage]]
pass = "quantize"
[stage.layers.default]
bits = 5
""" + "".join(f"[stage.layers.{n}]\nbits = 8\n" for n in totals_dense if n.startswith("conv"))
        recipe = Path(tmp) / "alexnet-pq.toml"
        recipe.write_text(text)
        t0 = time.time()
        res = toolchain.compress(net, recipe, retrain=False, progress=False, example_input=torch.zeros(1, 3, 227, 227))
        out = Path(tmp) / "alexnet-pq.onnx"
        export_quantized(res.network.eval(), out)
        rows = [layer_report(n, m, totals_dense[n]) for n, m in res.network.layers().items()
                if isinstance(m, _Shared)]
        return {"name": "alexnet", "rows": rows, "minutes": (time.time() - t0) / 60, "dense_bytes": dense_bytes,
                "bytes": out.stat().st_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet-300-100,lenet-5", help="comma list: lenet-300-100, lenet-5, alexnet")
    ap.add_argument("--out", default=None, help="folder for the files (default: models/NAME/)")
    ap.add_argument("--recipe", default=None, help="use this recipe instead of models/NAME/deep-compression.toml")
    ap.add_argument("--test", action="store_true", help="also report test-set errors (once, for the report)")
    ap.add_argument("--timing", action="store_true", help="measure onnxruntime session start and latency")
    ap.add_argument("--keep-int8", action="store_true", help="keep the pruned+int8 files beside the outputs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    splits = mnist_splits() if any(n.startswith("lenet") for n in names) else None
    results = [alexnet(args) if n == "alexnet" else lenet(n, args, splits) for n in names]
    for r in results:
        print(f"\n## {r['name']}: the paper's Table {'2' if r['name'] == 'lenet-300-100' else '3' if r['name'] == 'lenet-5' else '4'} layout "
              f"(ours; biases excluded as in the paper)\n")
        print(format_table(r["rows"]))
    print("\n## Table 1 layout: compression (weights, paper's counting) and files\n")
    print("| network | P | P+Q | P+Q+H | paper P / P+Q / P+Q+H | dense file | our file (graph) | ratio | "
          "our file with records | ratio | paper size | run (min) |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        t, p = totals(r["rows"]), PAPER[r["name"]]
        g = r.get("graph_bytes", r["bytes"])
        print(f"| {r['name']} | {t['P']:.0f}x | {t['P+Q']:.0f}x | {t['P+Q+H']:.0f}x | {p['P']} / {p['P+Q']} / {p['P+Q+H']} "
              f"| {r['dense_bytes']:,} | {g:,} | {r['dense_bytes'] / g:.1f}x | {r['bytes']:,} | "
              f"{r['dense_bytes'] / r['bytes']:.1f}x | {p['size']} | {r['minutes']:.1f} |")
    lenets = [r for r in results if "val" in r]
    if lenets:
        print("\n## Errors in stock onnxruntime (validation = the 10k held-out training images"
              + (", test = the 10k test images" if args.test else "") + ")\n")
        print("| network | split | dense | pruned (shipped) | P+Q (ours, portable file) | pruned + int8 (QDQ) | "
              "pruned, dense form + quantize_dynamic | paper |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in lenets:
            for split in ("val", "test"):
                if split in r:
                    e = r[split]
                    print(f"| {r['name']} | {split} | {e['dense']:.2%} | {e['pruned']:.2%} | {e['dc']:.2%} | "
                          f"{e['int8']:.2%} | {e['dyn']:.2%} | {PAPER[r['name']]['error']} |")
        print("\n| network | dense file | pruned file | P+Q file | pruned + int8 (QDQ) file | pruned, dense form | "
              "its quantize_dynamic |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in lenets:
            print(f"| {r['name']} | {r['dense_bytes']:,} | {r['pruned_bytes']:,} | {r['bytes']:,} | {r['i8_bytes']:,} | "
                  f"{r['dense_form_bytes']:,} | {r['dyn_bytes']:,} |")
    timed = [r for r in results if "timing" in r]
    if timed:
        print(f"\n## onnxruntime session start / steady-state latency (batch 1, median) on {CPU}\n")
        print("| network | dense | pruned | P+Q portable | pruned + int8 |")
        print("|---|---|---|---|---|")
        for r in timed:
            cells = " | ".join(f"{s:.1f} ms / {l * 1e3:.0f} us" for s, l in r["timing"].values())
            print(f"| {r['name']} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
