"""Sparse variational dropout (Molchanov et al. 2017): KL approximation, log-alpha pruning, export."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import toolchain
from toolchain.methods.prune.layers import MaskedConv2d, MaskedLinear
from toolchain.methods.sparse_vd import SVDConv2d, SVDLinear, kl_approx, svd_from_layer, to_masked


def test_kl_approximation_matches_the_paper_constants():
    la = torch.tensor([-20.0, 0.0, 20.0])
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    neg = k1 * torch.sigmoid(k2 + k3 * la) - 0.5 * torch.log1p(torch.exp(-la)) - k1
    torch.testing.assert_close(kl_approx(la), -neg)
    # the KL falls as alpha grows (noise costs nothing under the log-uniform prior), towards 0
    assert kl_approx(la)[0] > kl_approx(la)[1] > kl_approx(la)[2] > -1e-3


def test_log_alpha_pruning_keeps_exactly_the_weights_under_the_threshold():
    torch.manual_seed(0)
    layer = svd_from_layer(nn.Linear(20, 8), threshold=3.0, init_log_sigma2=-10.0)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-12, 2)
    la = (layer.log_sigma2 - torch.log(layer.weight ** 2 + 1e-8)).clamp(-10, 10)
    expected = la < 3.0
    assert 0 < int(expected.sum()) < expected.numel()  # the test sees both sides
    assert torch.equal(layer.keep(), expected)
    masked = to_masked(layer)
    assert isinstance(masked, MaskedLinear) and torch.equal(masked.mask, expected)
    assert torch.equal(masked.weight != 0, expected & (layer.weight != 0))
    x = torch.randn(5, 20)
    layer.eval()
    torch.testing.assert_close(masked(x), layer(x))  # evaluation = the pruned deterministic layer


def test_local_reparameterisation_has_the_right_mean_and_variance():
    torch.manual_seed(0)
    layer = SVDLinear(4, 3)
    with torch.no_grad():
        layer.log_sigma2.fill_(-2.0)
    x = torch.randn(1, 4).expand(20000, 4)
    layer.train()
    out = layer(x)
    mu = nn.functional.linear(x[:1], layer.weight, layer.bias)[0]
    var = (x[0] ** 2 * torch.exp(torch.tensor(-2.0))).sum()
    torch.testing.assert_close(out.mean(0), mu, atol=0.02, rtol=0)
    torch.testing.assert_close(out.var(0), var.expand(3), atol=0.03, rtol=0.05)


def test_conv_layer_and_a_pruned_start_keep_pruned_weights_at_zero():
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 3)
    keep = torch.rand_like(conv.weight) > 0.5
    conv.prune_(keep)
    svd = svd_from_layer(conv, 3.0, -10.0)
    assert isinstance(svd, SVDConv2d) and torch.equal(svd.mask, keep)
    svd.train()
    x = torch.randn(2, 2, 6, 6)
    svd(x).sum().backward()
    assert svd.weight.grad is not None and svd.log_sigma2.grad is not None
    assert not (to_masked(svd).mask & ~keep).any()


def test_sparse_vd_pass_prunes_and_exports_sparse(tmp_path, lenet300_path, mnist_small):
    torch.manual_seed(0)
    recipe = toolchain.Recipe.from_dict({"stage": [{
        "pass": "sparse_vd", "samples": 2000, "kl_weight": 1.0, "adam_lr": 3e-3, "threshold": 3.0,
        "layers": {"default": {}},
        "retrain": {"epochs": 1, "batch_size": 100, "lr": 1.0, "weight_decay": 0, "lr_policy": "fixed"}}]})
    net = toolchain.load(lenet300_path)
    result = toolchain.compress(net, recipe, data=mnist_small, progress=False)
    layers = result.network.layers()
    assert all(isinstance(m, MaskedLinear) for m in layers.values())
    nnz = sum(m.nnz() for m in layers.values())
    assert nnz < 266_610 * 0.9  # the KL pushed some log alphas past 3 (with N = 2000 it does so fast)
    assert result.error_after < 0.2
    out = tmp_path / "svd.onnx"
    toolchain.export(result.model, out, result=result)
    back = toolchain.load(out)
    assert sum(int((m.weight != 0).sum()) for m in back.layers().values()) <= nnz


def test_bad_options_are_recipe_errors():
    with pytest.raises(toolchain.RecipeError, match="optimizer"):
        toolchain.Recipe.from_dict({"stage": [{"pass": "sparse_vd", "optimizer": "rmsprop", "layers": {"default": {}}}]})
    with pytest.raises(toolchain.RecipeError, match="cannot follow"):
        toolchain.Recipe.from_dict({"stage": [{"pass": "lowrank", "layers": {"ip1": {"rank": 4}}},
                                              {"pass": "sparse_vd", "layers": {"default": {}}}]})


def test_layer_defaults_agree_between_linear_and_conv():
    lin, conv = SVDLinear(4, 3), SVDConv2d(2, 3, 3, padding=1)
    assert lin.threshold == conv.threshold == 3.0  # log alpha = 3: the paper's pruning threshold
    assert conv.padding == (1, 1) and conv.weight.shape == (3, 2, 3, 3)
    assert float(conv.log_sigma2.detach().max()) == float(lin.log_sigma2.detach().max()) == -10.0
