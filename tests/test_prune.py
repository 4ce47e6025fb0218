"""Pruning pass (Han et al. 2015): threshold rule, masks, dropout adjustment, dead-unit removal."""
import copy
import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters import import_onnx
from toolchain.methods.prune.layers import MaskedLinear
from toolchain.methods import get_pass
from toolchain.methods.prune.passes import PruneLayerOptions, PruneOptions, cubic_density, quality_threshold
from toolchain.methods.prune.surgery import remove_dead_units
from toolchain.train import TrainConfig, train


def mlp_with_dropout(p=0.5, seed=0):
    """784-64-32-10 with Dropout after the first two layers (ONNX-model-zoo style)."""
    rng = np.random.default_rng(seed)
    dims = [784, 64, 32, 10]
    nodes, inits, x = [], [], "input"
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten"))
    x = "flat"
    for i in range(3):
        w = (rng.standard_normal((dims[i + 1], dims[i])) / math.sqrt(dims[i])).astype(np.float32)
        b = (0.1 * rng.standard_normal(dims[i + 1])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i + 1}.weight"), numpy_helper.from_array(b, f"fc{i + 1}.bias")]
        nodes.append(helper.make_node("Gemm", [x, f"fc{i + 1}.weight", f"fc{i + 1}.bias"], [f"y{i}"], name=f"fc{i + 1}", transB=1))
        x = f"y{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i + 1}"))
            nodes.append(helper.make_node("Dropout", [f"r{i}", "ratio"], [f"d{i}"], name=f"drop{i + 1}"))
            x = f"d{i}"
    inits.append(numpy_helper.from_array(np.array(p, np.float32), "ratio"))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def make_prune(net, layers, **opts):
    cls = get_pass("prune")
    return cls(PruneOptions(**opts), {n: PruneLayerOptions(**o) for n, o in layers.items()})


def test_threshold_is_quality_times_std():
    net = import_onnx(mlp_with_dropout())
    w = net.layers()["fc1"].weight.detach().clone()
    make_prune(net, {"fc1": {"quality": 0.7}}, remove_dead_neurons=False).apply(net, 0)
    layer = net.layers()["fc1"]
    thr = 0.7 * float(w.std())
    assert quality_threshold(w, torch.ones_like(w, dtype=torch.bool), 0.7) == pytest.approx(thr)
    np.testing.assert_array_equal(layer.mask.numpy(), (w.abs() > thr).numpy())
    assert bool((layer.weight[~layer.mask] == 0).all())


def test_masks_never_regrow_through_retraining(mnist_small):
    tx, ty, _, _ = mnist_small
    net = import_onnx(mlp_with_dropout())
    p = make_prune(net, {n: {"quality": 1.0} for n in ("fc1", "fc2", "fc3")})
    p.apply(net, 0)
    masks = {n: m.mask.clone() for n, m in net.layers().items()}
    train(net, tx, ty, TrainConfig(epochs=0.5, lr=0.05, weight_decay=1e-3, l1=1e-5), p.hooks(net), progress=False)
    for n, m in net.layers().items():
        assert torch.equal(m.mask, masks[n])
        assert bool((m.weight[~m.mask] == 0).all()), n
    p.apply(net, 1)  # a second round only removes more
    for n, m in net.layers().items():
        assert bool((m.mask <= masks[n]).all()) and m.mask.sum() < masks[n].sum()


def test_density_targets_and_gradual_schedule():
    net = import_onnx(mlp_with_dropout())
    p = make_prune(net, {"fc1": {"density": 0.1}}, rounds=3, schedule="gradual", remove_dead_neurons=False)
    seen = []
    for r in range(3):
        p.apply(net, r)
        seen.append(net.layers()["fc1"].density())
    assert seen[0] > seen[1] > seen[2]
    assert seen[-1] == pytest.approx(0.1, abs=1e-3)
    assert cubic_density(0.1, 2, 3) == pytest.approx(0.1)


def test_teacher_is_the_network_before_the_stage_pruned_it():
    net = import_onnx(mlp_with_dropout())
    x = torch.randn(5, 1, 28, 28)
    net.eval()
    with torch.no_grad():
        want = net(x)
    assert make_prune(net, {"fc1": {"density": 0.1}}).hooks(net).teacher is None  # off by default
    p = make_prune(net, {"fc1": {"density": 0.1}}, rounds=2, teacher=True)
    p.apply(net, 0)
    teacher = p.hooks(net).teacher
    with torch.no_grad():
        assert torch.equal(teacher(x), want) and not torch.equal(net(x), want)
    assert not any(q.requires_grad for q in teacher.parameters()) and not teacher.training
    p.apply(net, 1)
    assert p.hooks(net).teacher is teacher  # kept from the first round on


def test_dropout_rate_scales_with_sqrt_of_connections():
    net = import_onnx(mlp_with_dropout(p=0.5))
    p = make_prune(net, {"fc1": {"density": 0.25}, "fc2": {"density": 0.64}}, remove_dead_neurons=False)
    p.apply(net, 0)
    (d1,), (d2,) = net.dropouts_after("fc1"), net.dropouts_after("fc2")
    assert d1.p == pytest.approx(0.5 * math.sqrt(0.25), rel=1e-3)
    assert d2.p == pytest.approx(0.5 * math.sqrt(0.64), rel=1e-3)


def test_dead_neuron_removal_keeps_outputs(lenet300_path):
    net = import_onnx(lenet300_path).eval()
    for name in ("ip1", "ip2", "ip3"):
        net.replace_layer(name, MaskedLinear_from(net.layers()[name]))
    L = net.layers()
    with torch.no_grad():
        L["ip1"].prune_(torch.arange(300)[:, None].expand(300, 784) % 7 != 0)  # rows 0,7,14..: no inputs
        L["ip2"].prune_(torch.arange(300)[None, :].expand(100, 300) % 5 != 1)  # cols 1,6,11..: no outputs
        L["ip3"].prune_(torch.arange(100)[None, :].expand(10, 100) % 9 != 0)  # ip2 units 0,9,..: no outputs
    x = torch.rand(64, 1, 28, 28)
    before = net(x)
    removed = remove_dead_units(net)
    after = net(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    expect_ip1 = len(set(range(0, 300, 7)) | set(range(1, 300, 5)))
    assert removed["ip1"] == expect_ip1 and removed["ip2"] == len(range(0, 100, 9))
    assert net.layers()["ip1"].weight.shape == (300 - expect_ip1, 784)
    assert net.layers()["ip2"].weight.shape == (100 - removed["ip2"], 300 - expect_ip1)


def test_dead_channel_removal_through_pool_and_flatten(lenet5_path):
    net = import_onnx(lenet5_path).eval()
    for name in ("conv1", "conv2", "ip1"):
        net.replace_layer(name, MaskedLinear_from(net.layers()[name]))
    L = net.layers()
    with torch.no_grad():
        keep = torch.ones_like(L["conv2"].mask)
        keep[[3, 17, 40]] = False  # conv2 filters with no inputs: constant channels folded into ip1's bias
        L["conv2"].prune_(keep)
        keep = torch.ones_like(L["conv1"].mask)
        keep[5] = False  # conv1 channel 5 has no inputs (constant) -> folded into conv2 bias (no padding)
        L["conv1"].prune_(keep)
    x = torch.rand(16, 1, 28, 28)
    before = net(x)
    removed = remove_dead_units(net)
    torch.testing.assert_close(net(x), before, atol=1e-4, rtol=1e-5)
    assert removed == {"conv1": 1, "conv2": 3}
    assert net.layers()["ip1"].weight.shape[1] == 47 * 16


def MaskedLinear_from(layer):
    from toolchain.methods.prune.layers import masked_from_dense

    return masked_from_dense(copy.deepcopy(layer))


def test_masked_linear_gradient_is_masked():
    layer = MaskedLinear(5, 3)
    layer.prune_(torch.rand(3, 5) > 0.5)
    layer(torch.randn(4, 5)).sum().backward()
    assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_sensitivity_table_and_plot(tmp_path, lenet300_path, capsys):
    from toolchain.cli import main

    png = tmp_path / "s.png"
    assert main(["sensitivity", str(lenet300_path), "--densities", "1,0.01", "--layers", "ip1,ip3",
                 "-o", str(png), "--no-progress"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ip")}
    dense_err, pruned_err = (float(c) for c in rows["ip1"].split("|")[2:4])
    import toolchain
    from toolchain.data import load_mnist

    _, _, vx, vy = load_mnist().holdout()  # the sweep is measured on the validation split, not the test set
    val_err = toolchain.evaluate(toolchain.load(lenet300_path), (vx, vy))
    assert dense_err == pytest.approx(round(100 * val_err, 2)) and pruned_err > dense_err  # 1% of ip1 alone hurts
    assert png.stat().st_size > 1000
    assert main(["sensitivity", str(lenet300_path), "--densities", "1.5", "-o", str(png)]) == 2
    assert main(["sensitivity", str(lenet300_path), "--layers", "fc9", "-o", str(png)]) == 2


def _dead_rows(net, n=4):
    with torch.no_grad():
        net.layers()["fc1"].weight[:n] = 0  # n units of fc1 get no input: dead


def test_finish_removes_dead_units_from_imported_graphs_only():
    from collections import OrderedDict

    from converters import from_module

    net = import_onnx(mlp_with_dropout())
    _dead_rows(net)
    x = torch.rand(3, 1, 28, 28)
    ref = net.eval()(x).detach()
    p = make_prune(net, {"fc1": {"density": 1.0}})
    p.finish(net)
    assert net.layers()["fc1"].out_features == 60 and p.removed == {"fc1": 4}
    assert torch.allclose(net.eval()(x), ref, atol=1e-5)
    assert "fc1: removed 4 dead neurons/channels" in p.summary(net)
    # a user's own module keeps its shapes (its forward may hard-code them)
    torch.manual_seed(0)
    seq = torch.nn.Sequential(OrderedDict(flatten=torch.nn.Flatten(), fc1=torch.nn.Linear(784, 64),
                                          relu1=torch.nn.ReLU(), fc2=torch.nn.Linear(64, 10)))
    own = from_module(seq, torch.zeros(1, 1, 28, 28))
    _dead_rows(own)
    p = make_prune(own, {"fc1": {"density": 1.0}})
    p.finish(own)
    assert own.layers()["fc1"].out_features == 64 and p.removed == {}
    # remove_dead_neurons = false: nothing removed
    net = import_onnx(mlp_with_dropout())
    _dead_rows(net)
    make_prune(net, {"fc1": {"density": 1.0}}, remove_dead_neurons=False).finish(net)
    assert net.layers()["fc1"].out_features == 64


def test_csr_to_dense_is_float32():
    from toolchain.methods.prune.csr import csr_to_dense

    out = csr_to_dense(np.array([1.5, 2.0, 0.25], np.float32), np.array([0, 2, 2], np.int32),
                       np.array([0, 1, 3], np.int32), 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1.5, 0, 0], [0, 0, 2.25]])  # duplicates summed


def test_sparse_positions_accept_adjacent_weights_and_name_the_weight():
    from toolchain.errors import ModelFormatError
    from toolchain.methods.prune.sparse_format import EncodedSparse, positions

    adjacent = EncodedSparse(np.ones(3, np.float32), np.array([0, 1, 2], np.int32), "positions", 3)
    np.testing.assert_array_equal(positions(adjacent), [0, 1, 2])
    gaps = EncodedSparse(np.ones(3, np.float32), np.array([1, 1, 1], np.uint8), "gaps", 3)
    np.testing.assert_array_equal(positions(gaps), [0, 1, 2])
    repeated = EncodedSparse(np.ones(2, np.float32), np.array([1, 1], np.int32), "positions", 5)
    with pytest.raises(ModelFormatError, match=r"^sparse weight: positions are not strictly increasing"):
        positions(repeated)
    with pytest.raises(ModelFormatError, match=r"^fc1\.weight: positions are not strictly increasing"):
        positions(repeated, "fc1.weight")
    floats = EncodedSparse(np.ones(2, np.float32), np.array([0.0, 1.0]), "positions", 5)
    with pytest.raises(ModelFormatError, match="indices must be integers, not float64"):
        positions(floats)
