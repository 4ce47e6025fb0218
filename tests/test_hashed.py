"""HashedNets layers, hashing, pass and portable ONNX export."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from toolchain.errors import RecipeError
from toolchain.methods.hashed.layers import (PRIME, HashedConv2d, HashedLinear, fmix32, hash_buckets, hash_coefficients,
                                     hash_signs, hashed_from_dense, poly_hash)
from toolchain.methods.hashed.baselines import equivalent_width, hashed_mlp, mlp, mlp_weights, random_keep_mask
from toolchain.methods.lowrank.passes import layer_seed
from toolchain.recipe import parse_recipe

from converters import from_module

ROOT = Path(__file__).resolve().parent.parent


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), ip1=nn.Linear(64, 32), relu1=nn.ReLU(), ip2=nn.Linear(32, 10)))


# ----- hashing -------------------------------------------------------------------------------------

def test_fmix32_matches_murmur3_reference():
    # murmur3's finaliser on 1 and 0xdeadbeef, computed with Python integers
    def ref(h):
        m = 0xFFFFFFFF
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m
        return h ^ (h >> 16)

    x = np.array([0, 1, 12345, 0xDEADBEEF, 0xFFFFFFFF], dtype=np.uint32)
    assert [int(v) for v in fmix32(x)] == [ref(int(v)) for v in x]
    assert int(fmix32(np.array([1], np.uint32))[0]) == 0x514E28B7


def test_poly_hash_is_exact_horner_over_the_prime_field():
    c = hash_coefficients(42, 0)
    assert len(c) == 4 and all(1 <= v < PRIME for v in c) and c != hash_coefficients(42, 1) != hash_coefficients(43, 1)
    n = np.array([0, 1, 2, 1000, PRIME - 1], dtype=np.int64)
    expect = [(((c[0] * int(v) + c[1]) * int(v) + c[2]) * int(v) + c[3]) % PRIME for v in n]  # Python big ints
    assert poly_hash(n, c).tolist() == expect


def test_buckets_are_spread_and_seed_dependent():
    b = hash_buckets(7, 100_000, 1000)
    counts = np.bincount(b, minlength=1000)
    assert counts.min() > 50 and counts.max() < 160  # ~Poisson(100)
    assert not np.array_equal(b, hash_buckets(8, 100_000, 1000))
    steps = np.bincount((b[1:] - b[:-1]) % 1000, minlength=1000)  # neighbours' buckets are unrelated
    assert steps.min() > 50 and steps.max() < 160
    s = hash_signs(7, 100_000).astype(float)
    assert set(np.unique(s)) == {-1, 1} and abs(s.mean()) < 0.02
    assert abs(np.corrcoef(s[:-1], s[1:])[0, 1]) < 0.02 and abs(np.corrcoef(s[:-784], s[784:])[0, 1]) < 0.02


def test_hashing_identical_across_processes():
    code = ("import json; from toolchain.methods.hashed.layers import hash_buckets, hash_signs; "
            "print(json.dumps([hash_buckets(12345, 5000, 97).tolist(), hash_signs(12345, 5000).tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONHASHSEED": "987", "PATH": ""})
    buckets, signs = json.loads(out.stdout)
    assert buckets == hash_buckets(12345, 5000, 97).tolist()
    assert signs == hash_signs(12345, 5000).tolist()


# ----- layers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradient_matches_dense_layer_of_virtual_matrix(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer = HashedLinear(20, 15, buckets=37, seed=3)
        x = torch.randn(8, 20)
        dense = nn.Linear(20, 15)
    else:
        layer = HashedConv2d(4, 6, 3, buckets=29, seed=5, padding=1, groups=2)
        x = torch.randn(2, 4, 7, 7)
        dense = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    with torch.no_grad():
        dense.weight.copy_(layer.virtual_weight())
        dense.bias.copy_(layer.bias)
    target = torch.randn_like(dense(x))
    (layer(x) * target).sum().backward()
    (dense(x) * target).sum().backward()
    assert torch.allclose(layer(x), dense(x), atol=1e-6)
    # dL/dw_k = sum over virtual weights n in bucket k of xi(n) dL/dV_n
    index, sign = layer.hash_tables()
    expect = torch.zeros(layer.buckets).index_add_(0, index, dense.weight.grad.reshape(-1) * sign)
    assert torch.allclose(layer.weight.grad, expect, atol=1e-5)
    assert torch.allclose(layer.bias.grad, dense.bias.grad, atol=1e-6)
    # autograd's numerical gradient check of the hashed weight, in double precision
    layer.double()
    xd = x.double()
    if kind == "linear":
        fn = lambda w: nn.functional.linear(xd, _virtual(layer, w))  # noqa: E731
    else:
        fn = lambda w: nn.functional.conv2d(xd, _virtual(layer, w), padding=1, groups=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (layer.weight.detach().clone().requires_grad_(),))


def _virtual(layer, w):
    index, sign = layer.hash_tables()
    return (w.index_select(0, index) * sign.to(w.dtype)).view(layer.weight_shape)


def test_saved_model_holds_no_index_matrix(tmp_path):
    layer = HashedLinear(784, 300, buckets=784 * 300 // 64, seed=1)
    layer(torch.zeros(1, 784))  # fills the run-time cache
    assert set(layer.state_dict()) == {"weight", "bias", "_extra_state"}
    path = tmp_path / "h.pt"
    torch.save(layer, path)
    assert path.stat().st_size < 4 * (layer.buckets + 300) + 4000
    loaded = torch.load(path, weights_only=False)
    assert loaded._index is None
    x = torch.randn(3, 784)
    assert torch.equal(loaded(x), layer(x))
    # a state_dict rebuilds the same layer (seed travels in the extra state)
    other = HashedLinear(784, 300, buckets=layer.buckets, seed=99)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))


def test_dense_init_is_bucket_mean():
    torch.manual_seed(0)
    dense = nn.Linear(30, 20)
    h = hashed_from_dense(dense, 50, seed=4, init="dense")
    index, sign = h.hash_tables()
    w = dense.weight.detach().reshape(-1) * sign
    for k in (0, 7, 49):
        members = index == k
        expect = w[members].mean() if members.any() else torch.tensor(0.0)
        assert torch.allclose(h.weight[k], expect, atol=1e-6)
    assert torch.equal(h.bias, dense.bias)
    # the bucket means are the least-squares fit: error below a perturbed fit
    err = ((h.virtual_weight() - dense.weight) ** 2).sum()
    with torch.no_grad():
        h.weight.add_(0.01)
    assert ((h.virtual_weight() - dense.weight) ** 2).sum() > err


def test_bucket_count_limits():
    assert HashedLinear(5, 4, buckets=20, seed=0).compression() == 1.0
    with pytest.raises(ValueError, match="buckets must be in"):
        HashedLinear(5, 4, buckets=21, seed=0)
    with pytest.raises(ValueError, match="buckets must be in"):
        HashedConv2d(2, 3, 3, buckets=0)


# ----- pass ----------------------------------------------------------------------------------------

def _recipe(layers: str, extra: str = "") -> str:
    return f"[[stage]]\npass = \"hashed\"\n{extra}\n{layers}\n[stage.retrain]\nepochs = 0\n"


def test_pass_replaces_layers_and_keeps_teacher():
    net = from_module(small_mlp(), torch.zeros(2, 1, 8, 8))
    x = torch.randn(4, 1, 8, 8)
    before = net(x).detach()
    recipe = parse_recipe(_recipe("[stage.layers.default]\ncompression = 0.125\ninit = \"dense\""))
    p = recipe.stages[0].make_pass(net)
    p.apply(net, 0)
    layers = net.layers()
    assert isinstance(layers["ip1"], HashedLinear) and layers["ip1"].buckets == round(0.125 * 64 * 32)
    assert isinstance(layers["ip2"], HashedLinear) and layers["ip2"].buckets == 40
    assert layers["ip1"].seed != layers["ip2"].seed
    teacher = p.hooks(net).teacher
    assert teacher is not None and torch.allclose(teacher(x), before)
    assert not any(q.requires_grad for q in teacher.parameters())
    assert p.summary(net)[0].startswith("ip1: 256 real weights for 2,048 virtual")


@pytest.mark.parametrize("table, message", [
    ("[stage.layers.ip1]\nbuckets = 5000", "more than its 2,048 virtual weights"),
    ("[stage.layers.ip1]\ncompression = 1.5", "compression must be in (0, 1]"),
    ("[stage.layers.ip1]\ncompression = 0.0", "compression must be in (0, 1]"),
    ("[stage.layers.ip1]\ncompression = 0.5\nbuckets = 3", "exactly one of compression or buckets"),
    ("[stage.layers.ip9]\ncompression = 0.5", "not in the model"),
])
def test_recipe_errors(table, message):
    net = from_module(small_mlp(), torch.zeros(2, 1, 8, 8))
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        recipe = parse_recipe(_recipe(table))
        p = recipe.stages[0].make_pass(net)
        p.check(net)
    assert isinstance(net.layers()["ip1"], nn.Linear)  # nothing changed


# ----- baselines -----------------------------------------------------------------------------------

def test_equivalent_width_and_hashed_mlp():
    full = mlp_weights([784, 1000, 10])
    h = equivalent_width(784, 10, 1, full // 8)
    assert mlp_weights([784, h, 10]) <= full // 8 < mlp_weights([784, h + 1, 10])
    h5 = equivalent_width(784, 10, 3, mlp_weights([784, 1000, 1000, 1000, 10]) // 64)
    assert mlp_weights([784, h5, h5, h5, 10]) <= mlp_weights([784, 1000, 1000, 1000, 10]) // 64
    net = hashed_mlp([784, 1000, 10], 1 / 8)
    ks = [m.buckets for m in net if isinstance(m, HashedLinear)]
    assert ks == [98000, 1250]
    wide = hashed_mlp([784, 2000, 10], 1 / 8, base_widths=[784, 1000, 10])  # virtual expansion: same K
    assert [m.buckets for m in wide if isinstance(m, HashedLinear)] == ks
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    m = random_keep_mask((30, 40), 0.25, seed=1)
    assert int(m.sum()) == 300 and torch.equal(m, random_keep_mask((30, 40), 0.25, seed=1))


def test_random_edges_pass_keeps_a_fixed_random_mask():
    from toolchain.methods.prune.layers import MaskedLinear

    net = from_module(small_mlp(), torch.zeros(2, 1, 8, 8))
    recipe = parse_recipe("[[stage]]\npass = \"random_edges\"\n[stage.layers.default]\ndensity = 0.125\n"
                          "[stage.layers.ip2]\ndensity = 0.5\ninit = \"random\"\n")
    p = recipe.stages[0].make_pass(net)
    p.apply(net, 0)
    ip1, ip2 = net.layers()["ip1"], net.layers()["ip2"]
    assert isinstance(ip1, MaskedLinear) and ip1.nnz() == 256 and ip2.nnz() == 160
    assert torch.equal(ip1.mask, random_keep_mask((32, 64), 0.125, layer_seed(0, "ip1")))  # same mask every run
    assert (ip1.weight[~ip1.mask] == 0).all()


# ----- export --------------------------------------------------------------------------------------

def _hashed_graph(seq, compression, input_shape=(1, 28, 28)):
    net = from_module(seq, torch.zeros(2, *input_shape))
    recipe = parse_recipe(_recipe(f"[stage.layers.default]\ncompression = {compression}"))
    recipe.stages[0].make_pass(net).apply(net, 0)
    return net.eval()


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_export_is_k_sized_and_matches_torch(tmp_path, opset):
    import onnxruntime as ort

    from toolchain.exporter import export_compressed
    from toolchain.measure import measure

    torch.manual_seed(0)
    seq = nn.Sequential(OrderedDict(flatten=nn.Flatten(), ip1=nn.Linear(784, 300), relu1=nn.ReLU(),
                                     ip2=nn.Linear(300, 100), relu2=nn.ReLU(), ip3=nn.Linear(100, 10)))
    net = _hashed_graph(seq, 1 / 64)
    path = tmp_path / "hashed.onnx"
    export_compressed(net, path, opset=opset)
    ks = {n: m.buckets for n, m in net.layers().items()}
    stored = sum(ks.values()) + 300 + 100 + 10
    assert stored * 4 <= path.stat().st_size <= stored * 4 + 12_000  # K real weights + biases + graph
    stats, totals = measure(path)
    by_name = {s.name: s for s in stats}
    assert by_name["ip1"].weight_shape == (300, 784) and by_name["ip1"].stored_bytes < 4 * (ks["ip1"] + 300) + 200
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(y - net(torch.from_numpy(x)).detach().numpy()).max() <= 1e-5


def test_export_hashed_conv_net(tmp_path):
    import onnxruntime as ort

    from toolchain.exporter import export_compressed

    torch.manual_seed(0)
    seq = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 20, 5), pool1=nn.MaxPool2d(2), conv2=nn.Conv2d(20, 50, 5, padding=1),
                                     pool2=nn.MaxPool2d(2), flatten=nn.Flatten(), ip1=nn.Linear(1250, 10)))
    net = _hashed_graph(seq, 1 / 8)
    assert isinstance(net.layers()["conv2"], HashedConv2d)
    path = tmp_path / "hashed_conv.onnx"
    export_compressed(net, path, form="fast")  # the fast form is the same graph for hashed layers
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(y - net(torch.from_numpy(x)).detach().numpy()).max() <= 1e-5
    k = sum(m.buckets for m in net.layers().values())
    assert path.stat().st_size < 4 * (k + 20 + 50 + 10) + 15_000


def test_compress_lenet300_end_to_end(tmp_path, lenet300_path, mnist_small):
    from converters import import_onnx
    from toolchain.driver import compress_network
    from toolchain.accuracy import evaluate_onnx
    from toolchain.exporter import export_compressed

    net = import_onnx(lenet300_path)
    recipe = parse_recipe(_recipe("[stage.layers.default]\ncompression = 0.125\ninit = \"dense\"").replace(
        "epochs = 0", "epochs = 3\nlr = 0.05\ndistill_temperature = 4\ndistill_weight = 0.5"))
    result = compress_network(net, recipe, mnist_small, progress=False)
    assert all(isinstance(m, HashedLinear) for m in result.net.layers().values())
    out = tmp_path / "lenet300-hashed.onnx"
    export_compressed(result.net, out)
    err = evaluate_onnx(out, progress=False, limit=1000).error
    assert err == pytest.approx(result.error_after, abs=1e-9)  # onnxruntime agrees with PyTorch
    assert err < 0.3  # 1/8 bucket means start near chance (~90%); 3 short epochs on 2k images recover most
    assert out.stat().st_size < lenet300_path.stat().st_size / 7


def test_hashed_file_reimports_as_hashed_layers(tmp_path, caplog):
    """An exported hashed model imports back as hashed layers (same K, seed, outputs) and re-exports K-sized."""
    import onnx

    from converters import import_onnx
    from toolchain.exporter import export_compressed

    torch.manual_seed(0)
    seq = nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 8, 5), pool1=nn.MaxPool2d(2), flatten=nn.Flatten(),
                                     ip1=nn.Linear(8 * 12 * 12, 32), relu1=nn.ReLU(), ip2=nn.Linear(32, 10)))
    net = _hashed_graph(seq, 1 / 8)
    path = tmp_path / "hashed.onnx"
    export_compressed(net, path)
    back = import_onnx(path)
    for name, m in net.layers().items():
        r = back.layers()[name]
        assert type(r) is type(m) and (r.buckets, r.seed, r.use_sign) == (m.buckets, m.seed, m.use_sign)
        assert torch.equal(r.weight, m.weight)
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(back(x), net(x), atol=1e-6)
    again = tmp_path / "again.onnx"
    export_compressed(back, again)
    assert abs(again.stat().st_size - path.stat().st_size) < 200

    # A record that does not reproduce the weight (edited file): that layer stays dense, with a warning.
    model = onnx.load(path)
    meta = next(p for p in model.metadata_props if p.key == "ai.toolchain.hashed")
    records = json.loads(meta.value)
    records["ip1"]["seed"] += 1
    meta.value = json.dumps(records)
    with caplog.at_level("WARNING"):
        edited = import_onnx(model)
    assert isinstance(edited.layers()["ip1"], nn.Linear) and isinstance(edited.layers()["ip2"], HashedLinear)
    assert "does not reproduce its weight" in caplog.text
    assert torch.allclose(edited(x), net(x), atol=1e-6)


def test_equivalent_width_is_exact_whatever_the_closed_form_estimate(monkeypatch):
    import types

    from toolchain.methods.hashed import baselines

    with pytest.raises(ValueError, match="need at least one hidden layer"):
        equivalent_width(784, 10, 0, 10_000)
    # a = 0 (one hidden layer): (2b - 1) / b rounds to 2.0 in floats, but h = 2 is over budget
    b = 10**17
    assert equivalent_width(b - 5, 5, 1, 2 * b - 1) == 1
    assert equivalent_width(b - 5, 5, 1, 2 * b) == 2
    # the closed form only seeds the search: an estimate that is too low or too high is corrected
    budget = mlp_weights([784, 300, 300, 10])
    for off in (-20.0, 0.0, 20.0):
        monkeypatch.setattr(baselines, "math", types.SimpleNamespace(sqrt=lambda v, off=off: math.sqrt(v) + off))
        assert equivalent_width(784, 10, 2, budget) == 300
        assert equivalent_width(784, 10, 2, budget - 1) == 299
    monkeypatch.undo()
    assert equivalent_width(784, 10, 2, 100) == 1  # a budget below one unit still gives width 1


def test_mlp_and_hashed_mlp_layout():
    assert list(mlp([6, 5, 4, 3])._modules) == ["flatten", "fc1", "relu1", "fc2", "relu2", "fc3"]  # no ReLU at the end
    assert list(mlp([6, 5, 3], dropout=0.5)._modules) == ["flatten", "fc1", "relu1", "drop1", "fc2"]
    net = hashed_mlp([6, 5, 4, 3], 0.5, seed=7)
    assert list(net._modules) == ["flatten", "fc1", "relu1", "fc2", "relu2", "fc3"]  # dropout defaults to none
    hashed = [m for m in net if isinstance(m, HashedLinear)]
    assert [m.seed for m in hashed] == [layer_seed(7, f"fc{i}") for i in (1, 2, 3)]
    assert [m.buckets for m in hashed] == [15, 10, 6]
    net.train()
    x = torch.randn(4, 6)
    assert torch.equal(net(x), net(x))  # nothing random in training mode without dropout


def test_random_keep_mask_is_a_boolean_mask():
    m = random_keep_mask((3, 4), 0.5, seed=0)
    assert m.dtype == torch.bool and m.shape == (3, 4) and int(m.sum()) == 6
    w = torch.arange(12.0).reshape(3, 4)
    assert w[m].numel() == 6 and w[~m].numel() == 6  # usable as an index, and negatable


def test_random_edges_density_bounds():
    from toolchain.methods.hashed.baselines import RandomEdgesLayerOptions

    assert RandomEdgesLayerOptions(density=1.0).density == 1.0  # keep everything: allowed
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            RandomEdgesLayerOptions(density=bad)
    with pytest.raises(RecipeError, match="density"):
        parse_recipe("[[stage]]\npass = \"random_edges\"\n[stage.layers.default]\ndensity = 1.5\n")


def test_random_edges_init_random_reinitialises_keep_keeps():
    net = from_module(small_mlp(), torch.zeros(2, 1, 8, 8))
    w1 = net.layers()["ip1"].weight.detach().clone()
    recipe = parse_recipe("[[stage]]\npass = \"random_edges\"\n[stage.layers.ip1]\ndensity = 0.5\n"
                          "[stage.layers.ip2]\ndensity = 0.5\ninit = \"random\"\n")
    recipe.stages[0].make_pass(net).apply(net, 0)
    ip1, ip2 = net.layers()["ip1"], net.layers()["ip2"]
    assert torch.equal(ip1.weight.detach(), w1 * ip1.mask)  # "keep": the trained weights, masked
    fresh = nn.Linear(32, 10)
    torch.manual_seed(layer_seed(0, "ip2"))
    fresh.reset_parameters()
    mask = random_keep_mask((10, 32), 0.5, layer_seed(0, "ip2"))
    assert torch.equal(ip2.weight.detach(), fresh.weight.detach() * mask)  # "random": re-initialised from its seed
    assert torch.equal(ip2.bias.detach(), fresh.bias.detach())
