"""Per-layer pruning sensitivity (Han et al. 2015, Fig. 6): prune one layer alone to each density
of a sweep, evaluate without retraining, keep every other layer dense."""
from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from .methods.prune.layers import masked_from_dense
from .methods.prune.passes import density_keep
from .train import evaluate

DEFAULT_DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01)


def sensitivity(net, val_x, val_y, densities=DEFAULT_DENSITIES, layers=None, progress=True, device=None):
    """layer -> [(density, error)] and the dense error, on held-out data (the validation split: choices
    made from this sweep must not see the test set); evaluated on `device` (default: where `net` is)."""
    from .train import _param_device, _run_device

    home, dev = _param_device(net), _run_device(net, device)
    net.to(dev)
    from .accuracy import fit_network_input

    val_x = fit_network_input(net, val_x, "validation")  # e.g. an MLP on [N, 784] fed [N, 1, 28, 28]
    base = evaluate(net, val_x, val_y)
    names = list(layers or net.layers())
    results = {}
    bar = tqdm(total=len(names) * len(densities), desc="sensitivity", disable=not progress)
    for name in names:
        results[name] = []
        for d in densities:
            trial = copy.deepcopy(net)
            layer = masked_from_dense(trial.layers()[name]).to(dev)
            with torch.no_grad():
                layer.prune_(density_keep(layer.weight, layer.mask, d))
            trial.replace_layer(name, layer)
            results[name].append((d, evaluate(trial, val_x, val_y)))
            bar.update(1)
    bar.close()
    net.to(home)
    return results, base


def format_sensitivity(results, base) -> str:
    densities = sorted({d for pts in results.values() for d, _ in pts}, reverse=True)
    head = "| layer | " + " | ".join(f"{100 * d:g}%" for d in densities) + " |"
    rows = [head, "|---|" + "---:|" * len(densities)]
    for name, pts in results.items():
        by_d = dict(pts)
        rows.append(f"| {name} | " + " | ".join(f"{100 * by_d[d]:.2f}" for d in densities) + " |")
    rows.append(f"\nvalidation error (%) after pruning one layer to the given density, no retraining; dense: {100 * base:.2f}%")
    return "\n".join(rows)
