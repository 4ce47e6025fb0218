"""Low-rank layers: truncated SVD, Denil et al.'s fixed dictionaries, the pass and its recipe checks."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from toolchain.errors import RecipeError
from toolchain.methods.lowrank.layers import (LowRankConv2d, LowRankLinear, dictionary_factorize, kernel_dictionary,
                                      make_dictionary, random_factors, rank_for_energy, svd_factorize)
from toolchain.methods.lowrank.passes import _value_shapes, input_layouts
from toolchain.recipe import parse_recipe

from converters import from_module



def lenet300(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), ip1=nn.Linear(784, 300), relu1=nn.ReLU(),
                                     ip2=nn.Linear(300, 100), relu2=nn.ReLU(), ip3=nn.Linear(100, 10)))


def lenet5(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 20, 5), pool1=nn.MaxPool2d(2), conv2=nn.Conv2d(20, 50, 5),
                                     pool2=nn.MaxPool2d(2), flatten=nn.Flatten(), ip1=nn.Linear(800, 500),
                                     relu1=nn.ReLU(), ip2=nn.Linear(500, 10)))


def stage(layers: str) -> str:
    return f"[[stage]]\npass = \"lowrank\"\n{layers}\n[stage.retrain]\nepochs = 0\n"


# ----- SVD -----------------------------------------------------------------------------------------

def test_svd_full_rank_reproduces_linear():
    torch.manual_seed(0)
    dense = nn.Linear(50, 30)
    f = svd_factorize(dense, 30)
    x = torch.randn(16, 50)
    assert torch.allclose(f(x), dense(x), atol=1e-5)
    assert torch.allclose(f.dense_weight(), dense.weight, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_svd_full_rank_reproduces_conv(groups):
    torch.manual_seed(0)
    dense = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
    rank = min(6 // groups, 4 // groups * 9)
    f = svd_factorize(dense, rank)
    x = torch.randn(2, 4, 9, 9)
    assert isinstance(f, LowRankConv2d)
    assert torch.allclose(f(x), dense(x), atol=1e-5)
    assert torch.allclose(f.dense_weight(), dense.weight, atol=1e-6)


def test_truncated_svd_is_the_best_rank_r_approximation_and_uses_two_products():
    torch.manual_seed(0)
    dense = nn.Linear(200, 100)
    f = svd_factorize(dense, 10)
    assert f.factored_is_cheaper()  # 10 * 300 < 200 * 100
    s = torch.linalg.svdvals(dense.weight.detach().double())
    err = torch.linalg.matrix_norm(f.dense_weight().double() - dense.weight.double()) ** 2
    assert torch.allclose(err, (s[10:] ** 2).sum(), rtol=1e-4)
    x = torch.randn(3, 200)
    assert torch.allclose(f(x), nn.functional.linear(x, f.dense_weight(), f.bias), atol=1e-5)
    assert rank_for_energy(dense, 1.0) == 100
    frac = torch.cumsum(s**2, 0) / (s**2).sum()
    r = rank_for_energy(dense, 0.5)
    assert frac[r - 1] >= 0.5 > frac[r - 2]


# ----- Denil et al. --------------------------------------------------------------------------------

def test_fixed_dictionary_stays_fixed_in_training():
    torch.manual_seed(0)
    dense = nn.Linear(784, 30)
    a = make_dictionary("kernel", 784, 50, np.random.default_rng(0), layout=(28, 28))
    f = dictionary_factorize(dense, a, "fit", torch.Generator().manual_seed(0), "kernel")
    assert "basis" in dict(f.named_buffers()) and "basis" not in dict(f.named_parameters())
    basis, coef = f.basis.clone(), f.coef.detach().clone()
    opt = torch.optim.SGD(f.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        loss = f(torch.randn(8, 784)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(f.basis, basis)
    assert not torch.allclose(f.coef, coef)
    assert f.learned_parameters() == 50 * 30 + 30


def test_full_dictionary_fit_reproduces_layer():
    torch.manual_seed(0)
    dense = nn.Linear(40, 12)
    a = make_dictionary("random", 40, 40, np.random.default_rng(1))
    f = dictionary_factorize(dense, a, "fit", torch.Generator().manual_seed(0), "random")
    assert torch.allclose(f.dense_weight(), dense.weight, atol=1e-5)


def test_kernel_dictionary_interpolates_smooth_weights():
    # weights that are a smooth function of pixel position are predicted well from 10% of them
    yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    smooth = np.stack([np.sin(yy / 5.0 + k) * np.cos(xx / 6.0 - k) for k in range(8)]).reshape(8, 784)
    dense = nn.Linear(784, 8)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(smooth))
    gen = np.random.default_rng(0)
    errs = {}
    for kind in ("kernel", "identity", "random"):
        a = make_dictionary(kind, 784, 78, gen, layout=(28, 28))
        f = dictionary_factorize(dense, a, "fit", torch.Generator().manual_seed(0), kind)
        errs[kind] = float(((f.dense_weight() - dense.weight) ** 2).sum().detach() / (dense.weight**2).sum().detach())
    assert errs["kernel"] < 0.05 < errs["identity"] and errs["kernel"] < errs["random"]


def test_kernel_dictionary_rows_and_columns():
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(6), indexing="ij"), -1).reshape(-1, 2).astype(float)
    a = kernel_dictionary(coords, 9, np.random.default_rng(0), lengthscale=1.0, ridge=1e-6)
    atoms = np.argmax(np.abs(a), axis=1)
    assert np.allclose(a[:, atoms], np.eye(9), atol=1e-4)  # the atoms themselves are reproduced
    col = make_dictionary("kernel", 36, 12, np.random.default_rng(0), columns=3, layout=(6, 6)).numpy()
    support = [set(np.flatnonzero(np.abs(col[i]) > 0)) for i in range(12)]
    blocks = [support[0] | support[1] | support[2] | support[3], support[4] | support[5] | support[6] | support[7],
              support[8] | support[9] | support[10] | support[11]]
    assert all(not (blocks[i] & blocks[j]) for i in range(3) for j in range(i + 1, 3))  # disjoint subsets
    assert len(blocks[0] | blocks[1] | blocks[2]) == 36


def test_kernel_dictionary_warns_when_channels_outnumber_atoms(caplog):
    """Channels are uncorrelated, so with fewer atoms than channels some channels cannot be predicted at all."""
    with caplog.at_level("WARNING"):
        a = make_dictionary("kernel", 500, 18, np.random.default_rng(0), layout=(20, 5, 5)).numpy()
    assert "18 atoms for 20 uncorrelated input channels; 2 channels get no atom" in caplog.text
    per_channel = np.abs(a).reshape(18, 20, 25).sum(axis=(0, 2))
    assert (per_channel == 0).sum() == 2  # exactly those two channels are predicted as zero
    caplog.clear()
    with caplog.at_level("WARNING"):
        make_dictionary("kernel", 500, 40, np.random.default_rng(0), layout=(20, 5, 5))
    assert "uncorrelated" not in caplog.text


def test_conv_dictionary_and_random_init():
    torch.manual_seed(0)
    dense = nn.Conv2d(20, 50, 5)
    a = make_dictionary("kernel", 500, 100, np.random.default_rng(0), layout=(20, 5, 5))
    f = dictionary_factorize(dense, a, "random", torch.Generator().manual_seed(0), "kernel")
    assert isinstance(f, LowRankConv2d) and f.basis.shape == (100, 20, 5, 5) and f.coef.shape == (50, 100, 1, 1)
    x = torch.randn(2, 20, 12, 12)
    assert f(x).shape == (2, 50, 8, 8)
    assert torch.allclose(f(x), nn.functional.conv2d(x, f.dense_weight(), f.bias), atol=1e-4)
    ratio = float(f.dense_weight().detach().var() / (1 / (3 * 500)))
    assert 0.5 < ratio < 2  # the default-init variance


def test_random_factors_redraw_the_bias_symmetrically():
    torch.manual_seed(0)
    dense = nn.Linear(25, 400)
    f = random_factors(dense, 5, torch.Generator().manual_seed(3))
    bound = 1 / 25 ** 0.5  # PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    b = f.bias.detach()
    assert not torch.equal(b, dense.bias.detach())
    assert float(b.abs().max()) <= bound and float(b.min()) < -0.8 * bound and float(b.max()) > 0.8 * bound
    assert abs(float(b.mean())) < 0.1 * bound


def test_learned_parameters_with_and_without_bias():
    torch.manual_seed(0)
    for bias in (True, False):
        dense = nn.Linear(30, 20, bias=bias)
        f = svd_factorize(dense, 4)
        assert f.learned_parameters() == 4 * 30 + 20 * 4 + (20 if bias else 0)  # both factors trained
        a = make_dictionary("identity", 30, 6, np.random.default_rng(0))
        d = dictionary_factorize(dense, torch.as_tensor(a, dtype=torch.float32), "fit", torch.Generator(), "identity")
        assert d.learned_parameters() == 20 * 6 + (20 if bias else 0)  # fixed basis: coef (and bias) only
        assert d.stored_parameters() == 6 * 30 + 20 * 6 + (20 if bias else 0)


# ----- pass ----------------------------------------------------------------------------------------

def test_input_layouts_found_through_flatten():
    assert input_layouts(from_module(lenet300(), torch.zeros(2, 1, 28, 28)), ["ip1", "ip2"]) == {"ip1": (28, 28), "ip2": None}
    assert input_layouts(from_module(lenet5(), torch.zeros(2, 1, 28, 28)), ["conv1", "conv2", "ip1", "ip2"]) == {
        "conv1": (5, 5), "conv2": (20, 5, 5), "ip1": (50, 4, 4), "ip2": None}


@pytest.mark.parametrize("dims", [[0, 1, 28, 28], [None, 1, 28, 28], ["N", 1, 28, 28], [2, 1, 28, 28]])
def test_value_shapes_are_at_batch_one_whatever_the_declared_batch(dims):
    net = from_module(lenet300(), torch.zeros(2, 1, 28, 28))
    net.input_shapes["input"] = dims  # 0: an unknown dimension as some exporters write it
    shapes = _value_shapes(net)
    batch = 2 if dims[0] == 2 else 1
    assert shapes["input"] == (batch, 1, 28, 28) and shapes["flatten_out"] == (batch, 784)
    assert shapes["output"] == (batch, 10)


def test_svd_pass_by_compression_and_energy():
    net = from_module(lenet300(), torch.zeros(2, 1, 28, 28))
    recipe = parse_recipe(stage("[stage.layers.ip1]\ncompression = 0.2\n[stage.layers.ip2]\nenergy = 1.0"))
    p = recipe.stages[0].make_pass(net)
    x = torch.rand(5, 1, 28, 28)
    before = net(x).detach()
    p.apply(net, 0)
    ip1, ip2 = net.layers()["ip1"], net.layers()["ip2"]
    assert isinstance(ip1, LowRankLinear) and ip1.rank == int(0.2 * 784 * 300 / 1084)
    assert ip1.basis.numel() + ip1.coef.numel() <= 0.2 * 784 * 300
    assert ip2.rank == 100 and isinstance(net.layers()["ip3"], nn.Linear)
    assert not ip1.fixed_basis and ip1.basis.requires_grad
    assert (net(x) - before).abs().max() < 0.5  # a rank-43 approximation of a random layer changes little
    assert "ip1: rank 43" in p.summary(net)[0]


def test_denil_pass_on_lenet5():
    net = from_module(lenet5(), torch.zeros(2, 1, 28, 28))
    recipe = parse_recipe(stage("[stage.layers.default]\nmethod = \"denil\"\ncompression = 0.25\ncolumns = 2\n"
                                "[stage.layers.ip2]\nmethod = \"denil\"\ndictionary = \"identity\"\ncompression = 0.2"))
    p = recipe.stages[0].make_pass(net)
    p.apply(net, 0)
    layers = net.layers()
    assert all(layers[n].fixed_basis for n in layers)
    assert layers["conv2"].rank == 125 and layers["ip1"].rank == 200 and layers["ip2"].rank == 100
    assert layers["ip1"].dictionary == "kernel" and layers["ip2"].dictionary == "identity"
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert "predicted" in p.summary(net)[0]


@pytest.mark.parametrize("table, message", [
    ("[stage.layers.ip2]\nrank = 101", "rank 101 is larger than the layer allows (100"),
    ("[stage.layers.ip2]\nmethod = \"denil\"\nrank = 301", "dictionary size 301 is larger than the layer allows (300"),
    ("[stage.layers.ip3]\ncompression = 0.01", "compression 0.01 leaves a rank of 0"),
    ("[stage.layers.ip3]\ncompression = 0.01", "(rank 1 needs compression >= 0.11)"),  # (o + f) / (o f), 10 x 100
    ("[stage.layers.ip3]\nmethod = \"denil\"\ncompression = 0.001", "(dictionary size 1 needs compression >= 0.01)"),
    ("[stage.layers.ip1]\ncompression = 1.2", "compression must be in (0, 1]"),
    ("[stage.layers.ip1]\ncompression = 0", "compression must be in (0, 1]"),
    ("[stage.layers.ip1]\nmethod = \"denil\"\ndictionary = \"fourier\"\ncompression = 0.1", "unknown dictionary 'fourier'"),
    ("[stage.layers.ip1]\nmethod = \"tucker\"\ncompression = 0.1", "unknown method 'tucker'"),
    ("[stage.layers.ip1]\ndictionary = \"kernel\"\ncompression = 0.1", "applies to method = 'denil' only"),
    ("[stage.layers.ip1]\nmethod = \"denil\"\nlayout = [27, 28]\ncompression = 0.1", "layout (27, 28) has 756 inputs"),
    ("[stage.layers.ip1]\nrank = 3\nenergy = 0.9", "exactly one of rank, compression or energy"),
    ("[stage.layers.ip1]\nrank = 40\n[stage.layers.ip2]\nmethod = \"denil\"\nlayout = [10, 10]\ncompression = 0.1",
     "layout (10, 10) has 100 inputs"),  # ip1 was fine, but is not replaced either
])
def test_recipe_errors(table, message):
    net = from_module(lenet300(), torch.zeros(2, 1, 28, 28))
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe = parse_recipe(stage(table))
        recipe.stages[0].make_pass(net).apply(net, 0)
    assert all(isinstance(m, nn.Linear) for m in net.layers().values())  # nothing was replaced


# ----- export --------------------------------------------------------------------------------------

def _run_onnx(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("model, table", [
    (lenet300, "[stage.layers.ip1]\nrank = 40\n[stage.layers.ip2]\nrank = 20"),
    (lenet300, "[stage.layers.default]\nmethod = \"denil\"\ndictionary = \"identity\"\ncompression = 0.1"),
    (lenet5, "[stage.layers.default]\nmethod = \"denil\"\ncompression = 0.1\ncolumns = 2"),
    (lenet5, "[stage.layers.conv2]\nrank = 10\n[stage.layers.ip1]\nenergy = 0.5"),
])
def test_export_matches_torch_and_stores_the_factors(tmp_path, model, table):
    from toolchain.exporter import export_compressed
    from toolchain.methods.lowrank.layers import _LowRank
    from toolchain.measure import measure

    net = from_module(model(), torch.zeros(2, 1, 28, 28))
    recipe = parse_recipe(stage(table))
    recipe.stages[0].make_pass(net).apply(net, 0)
    net.eval()
    path = tmp_path / "lowrank.onnx"
    export_compressed(net, path)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    assert np.abs(_run_onnx(path, x) - net(torch.from_numpy(x)).detach().numpy()).max() <= 1e-5
    # the file holds the factors (an identity dictionary as input indices), not dense weights
    layers = net.layers()
    stored = 0
    for m in layers.values():
        if isinstance(m, _LowRank) and m.factored_is_cheaper():
            selection = m.dictionary == "identity" and isinstance(m, LowRankLinear)
            stored += (m.rank * 2 if selection else m.basis.numel()) + m.coef.numel() + m.bias.numel()
        elif isinstance(m, _LowRank):
            stored += m.dense_weight().numel() + m.bias.numel()
        else:
            stored += m.weight.numel() + m.bias.numel()  # int64 indices count twice (8 bytes)
    size = path.stat().st_size
    assert stored * 4 <= size <= stored * 4 * 1.05 + 4000
    assert measure(path)[1]["stored_bytes"] == pytest.approx(stored * 4, abs=64)


def test_finetuning_end_to_end(tmp_path, lenet300_path, mnist_small):
    from converters import import_onnx
    from toolchain.driver import compress_network
    from toolchain.accuracy import evaluate_onnx
    from toolchain.exporter import export_compressed

    net = import_onnx(lenet300_path)
    recipe = parse_recipe("[[stage]]\npass = \"lowrank\"\nteacher = true\n[stage.layers.ip1]\nrank = 40\n"
                          "[stage.layers.ip2]\nrank = 20\n[stage.retrain]\nepochs = 1\nlr = 0.005\n"
                          "distill_temperature = 4\ndistill_weight = 0.5\n")
    result = compress_network(net, recipe, mnist_small, progress=False)
    assert isinstance(result.net.layers()["ip1"], LowRankLinear) and isinstance(result.net.layers()["ip3"], nn.Linear)
    out = tmp_path / "svd.onnx"
    export_compressed(result.net, out)
    err = evaluate_onnx(out, progress=False, limit=1000).error
    assert err == pytest.approx(result.error_after, abs=1e-9)
    assert err <= result.error_before + 0.02  # a rank-40/20 SVD of the trained net stays close to it
    assert out.stat().st_size < lenet300_path.stat().st_size / 4.5
