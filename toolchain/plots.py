"""PNG figures: sparsity pattern of each pruned layer (Han et al. Fig. 4), sensitivity curves, latency bars."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from converters.fileio import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def sparsity_patterns(net, out_dir) -> list[Path]:
    """One PNG per masked layer: the [out, in] mask; for a layer with 784 inputs also the
    28x28 map of how many connections each input pixel kept."""
    from .methods.prune.layers import _Masked

    plt = _plt()
    out_dir = Path(out_dir)
    paths = []
    for name, layer in net.layers().items():
        if not isinstance(layer, _Masked):
            continue
        mask = layer.mask.detach().cpu().numpy().reshape(layer.mask.shape[0], -1)
        image_in = mask.shape[1] == 784
        fig, axes = plt.subplots(1, 2 if image_in else 1, figsize=(11 if image_in else 7, 4.5))
        ax = axes[0] if image_in else axes
        ax.imshow(mask, cmap="Greys", aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}: {mask.mean():.1%} of {mask.size:,} weights kept")
        ax.set_xlabel("input")
        ax.set_ylabel("output")
        if image_in:
            im = axes[1].imshow(mask.sum(0).reshape(28, 28), cmap="viridis")
            axes[1].set_title("surviving connections per input pixel")
            fig.colorbar(im, ax=axes[1])
        paths.append(_save(fig, out_dir / f"sparsity-{name}.png"))
    return paths


def sensitivity_plot(results: dict[str, list[tuple[float, float]]], path, baseline_error: float) -> Path:
    """results: layer -> [(density, error)]; plots accuracy vs density per layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in results.items():
        d, e = zip(*sorted(pts))
        ax.plot(np.array(d) * 100, 100 * (1 - np.array(e)), marker="o", label=name)
    ax.axhline(100 * (1 - baseline_error), color="k", ls="--", lw=0.8, label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("weights kept (%)")
    ax.set_ylabel("test accuracy (%) without retraining")
    ax.set_title("pruning sensitivity per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    lo = min(100 * (1 - e) for pts in results.values() for _, e in pts)
    ax.set_ylim(max(0, math.floor(lo) - 1), 100)
    return _save(fig, Path(path))


def latency_plot(rows, path) -> Path:
    """Bars of median latency (with IQR) per (batch, threads), model vs dense baseline."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"b{t.batch}/t{t.threads}" for t, _ in rows]
    x = np.arange(len(rows))
    w = 0.38
    med = [t.median_ms for t, _ in rows]
    err = [[t.median_ms - t.p25_ms for t, _ in rows], [t.p75_ms - t.median_ms for t, _ in rows]]
    ax.bar(x - w / 2, med, w, yerr=err, label=rows[0][0].model)
    if all(b is not None for _, b in rows):
        bm = [b.median_ms for _, b in rows]
        be = [[b.median_ms - b.p25_ms for _, b in rows], [b.p75_ms - b.median_ms for _, b in rows]]
        ax.bar(x + w / 2, bm, w, yerr=be, label=rows[0][1].model)
    ax.set_xticks(x, labels)
    ax.set_ylabel("median latency (ms)")
    ax.set_yscale("log")
    ax.legend()
    return _save(fig, Path(path))
