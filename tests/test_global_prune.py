"""Global magnitude pruning with the cubic schedule (Zhu & Gupta 2017)."""
import pytest
import torch
import torch.nn as nn

import toolchain
from toolchain.methods.global_prune import cubic_sparsity, global_masks
from toolchain.methods.prune.layers import masked_from_dense


def _layers(seed=0):
    torch.manual_seed(seed)
    layers = {"a": masked_from_dense(nn.Linear(50, 40)), "b": masked_from_dense(nn.Conv2d(3, 8, 3)),
              "c": masked_from_dense(nn.Linear(40, 10))}
    with torch.no_grad():
        layers["c"].weight.mul_(10)  # layers of very different scales
    return layers


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_one_threshold_gives_the_requested_sparsity_over_the_whole_network(sparsity):
    layers = _layers()
    masks = global_masks(layers, sparsity)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round((1 - sparsity) * total)
    # one threshold: every kept weight is at least as large as every pruned one, across layers
    kept_min = min(float(layers[n].weight.detach().abs()[m].min()) for n, m in masks.items() if m.any())
    pruned_max = max(float(layers[n].weight.detach().abs()[~m].max()) for n, m in masks.items() if (~m).any())
    assert kept_min >= pruned_max
    # not per-layer: the large-scale layer keeps far more than the network-wide fraction
    assert masks["c"].float().mean() > 1 - sparsity


def test_normalised_scores_and_masks_only_shrink():
    layers = _layers()
    masks = global_masks(layers, 0.8, normalize="std")
    assert masks["c"].float().mean() < 0.9  # normalised: the big layer no longer keeps almost everything
    for n, m in masks.items():
        layers[n].prune_(m)
    again = global_masks(layers, 0.5)  # a lower target cannot revive pruned weights
    for n, m in again.items():
        assert not (m & ~masks[n]).any()


def test_cubic_schedule():
    assert cubic_sparsity(0.9, 0.0, 0, 10) == pytest.approx(0.0)
    assert cubic_sparsity(0.9, 0.0, 10, 10) == pytest.approx(0.9)
    assert cubic_sparsity(0.9, 0.0, 5, 10) == pytest.approx(0.9 - 0.9 * 0.125)


def test_global_pass_end_to_end_and_bad_targets(lenet300_path):
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "global_prune", "sparsity": 0.95, "rounds": 3,
                                                    "layers": {"default": {}}, "retrain": {"epochs": 0}}]})
    result = toolchain.compress(toolchain.load(lenet300_path), recipe, retrain=False, progress=False)
    kept = sum(int((getattr(m, "masked_weight", m.weight) != 0).sum()) for m in result.network.layers().values())
    assert kept <= round(0.05 * 266_200) + 1
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(toolchain.RecipeError, match=r"\(0, 1\)"):
            toolchain.Recipe.from_dict({"stage": [{"pass": "global_prune", "sparsity": bad, "layers": {"default": {}}}]})
