"""Dynamic Network Surgery (Guo et al. 2016): two-threshold masks, straight-through gradients, splicing."""
import pytest
import torch
import torch.nn as nn

import toolchain
from toolchain.methods.prune.layers import MaskedLinear
from toolchain.methods.splicing import SplicedConv2d, SplicedLinear, splice_thresholds, spliced_from_layer, to_masked


def test_two_thresholds_prune_below_a_splice_above_b_keep_in_between():
    layer = SplicedLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.05, 0.15, 0.25, 0.5]]))
        layer.mask.copy_(torch.tensor([[True, True, False, False]]))
    layer.set_thresholds(0.1, 0.3)
    layer.splice_()
    # 0.05 < a: pruned; 0.15 in [a, b]: stays on; 0.25 in [a, b]: stays off; 0.5 > b: spliced back
    assert layer.mask.tolist() == [[False, True, False, True]]


def test_pruned_weights_keep_updating_and_come_back_above_the_splice_threshold():
    torch.manual_seed(0)
    layer = SplicedLinear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.02, 0.8, -0.9]]))
    layer.set_thresholds(0.1, 0.2)
    layer.splice_()
    assert layer.mask.tolist() == [[False, True, True]]
    x = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(layer(x).detach()) == 0.0  # the pruned weight does not act in the forward ...
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(10):  # ... but its gradient still reaches it (target 1 on the pruned input)
        opt.zero_grad()
        ((layer(x) - 1.0) ** 2).sum().backward()
        assert layer.weight.grad[0, 0] != 0
        opt.step()
        layer.splice_()
        if layer.mask[0, 0]:
            break
    assert float(layer.weight[0, 0].detach().abs()) > 0.2 and bool(layer.mask[0, 0])  # back above b: spliced in
    assert float(layer(x).detach()) != 0.0


def test_thresholds_from_mean_and_std_and_conversion():
    torch.manual_seed(0)
    conv = spliced_from_layer(nn.Conv2d(2, 3, 3))
    assert isinstance(conv, SplicedConv2d)
    a, b = splice_thresholds(conv.weight, conv.mask, crate=0.5, margin=0.1)
    t = float(conv.weight.abs().mean() + 0.5 * conv.weight.abs().std())
    assert a == pytest.approx(0.9 * t) and b == pytest.approx(1.1 * t)
    conv.set_thresholds(a, b)
    conv.splice_()
    assert 0 < conv.nnz() < conv.weight.numel()
    m = to_masked(conv)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(m(x), conv(x))


def test_splicing_pass_end_to_end(lenet300_path, mnist_small):
    recipe = toolchain.Recipe.from_dict({"stage": [{
        "pass": "splicing", "layers": {"default": {"crate": 0.5}, "ip3": {"crate": 0.0}},
        "retrain": {"epochs": 0.5, "lr": 0.005, "batch_size": 100}}]})
    result = toolchain.compress(toolchain.load(lenet300_path), recipe, data=mnist_small, progress=False)
    layers = result.network.layers()
    assert all(isinstance(m, MaskedLinear) for m in layers.values())
    assert sum(m.nnz() for m in layers.values()) < 0.6 * 266_610
    assert result.error_after < 0.1


def test_splicing_after_weight_tying_is_one_recipe_error():
    with pytest.raises(toolchain.RecipeError, match="splicing.*cannot follow.*hashed"):
        toolchain.Recipe.from_dict({"stage": [{"pass": "hashed", "layers": {"default": {"compression": 0.125}}},
                                              {"pass": "splicing", "layers": {"default": {}}}]})


def test_spliced_conv_takes_keyword_arguments_as_nn_conv2d():
    conv = SplicedConv2d(2, 4, 3, stride=2, padding=1, bias=False, padding_mode="reflect")
    assert conv.stride == (2, 2) and conv.padding == (1, 1) and conv.bias is None and conv.padding_mode == "reflect"
    assert conv(torch.randn(1, 2, 6, 6)).shape == (1, 4, 3, 3)


def test_splicing_options_bounds_and_message():
    from toolchain.methods.splicing.passes import SplicingOptions

    assert SplicingOptions(gamma=0.0, power=0.5).power == 0.5  # a slowly decaying update probability is fine
    assert SplicingOptions(power=0.0).power == 0.0  # power 0: update after every step
    for kw in (dict(power=-0.5), dict(gamma=-1e-4)):
        with pytest.raises(ValueError, match="^gamma and power must be >= 0$"):
            SplicingOptions(**kw)
