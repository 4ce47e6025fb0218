"""Structured pruning (Li et al. 2017): L1 ranking, removal through pooling / flatten, dense export."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import toolchain
from toolchain.methods.structured import l1_ranking


def small_convnet(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "small.onnx"
    toolchain.export(model, path, example_input=x)
    return toolchain.load(path)


def test_l1_ranking_orders_units_by_l1_norm():
    layer = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0], [-3, 0, 0], [0.5, 0.5, 1.5], [0, 0, 0.1]]))
    assert l1_ranking(layer).tolist() == [1, 2, 0, 3]


def test_removal_keeps_the_unpruned_channels_outputs_bit_identical(tmp_path):
    net = small_convnet(tmp_path)
    names = list(net.layers())
    before = {n: net.layers()[n] for n in names}
    ranking = {n: l1_ranking(before[n]) for n in names}
    x = torch.randn(4, 1, 28, 28)
    net.eval()
    ref = net.run(x)
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "structured", "layers": {
        names[0]: {"channels": 4}, names[1]: {"keep": 0.5}, names[2]: {"channels": 10}}}]})
    result = toolchain.compress(net, recipe, retrain=False, progress=False)
    layers = result.network.layers()
    assert [layers[n].weight.shape[0] for n in names] == [4, 4, 10, 10]
    assert layers[names[1]].weight.shape[1] == 4 and layers[names[2]].weight.shape[1] == 4 * 25
    # conv1: its kept channels compute exactly what they computed before (same filters, same input)
    kept0 = torch.sort(ranking[names[0]][:4]).values
    out0 = result.network.run(x)[result.network.node(names[0]).outputs[0]]
    assert torch.equal(out0, ref[net.node(names[0]).outputs[0]][:, kept0])
    # the last layer (unpruned) still sees ten outputs and the whole thing runs in stock onnxruntime
    path = tmp_path / "s.onnx"
    toolchain.export(result.model, path, result=result)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(y, result.network(x).detach().numpy(), atol=1e-5)
    assert {n.op_type for n in __import__("onnx").load(str(path)).graph.node} <= {
        "Conv", "Relu", "MaxPool", "Flatten", "Reshape", "Gemm", "MatMul", "Add"}


def test_kept_channels_through_the_first_cut_are_bit_identical_one_layer(tmp_path):
    net = small_convnet(tmp_path)
    name = list(net.layers())[1]
    conv = net.layers()[name]
    order = l1_ranking(conv)
    x = torch.randn(3, 1, 28, 28)
    net.eval()
    ref = net.run(x)[net.node(name).outputs[0]]
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "structured", "layers": {name: {"channels": 3}}}]})
    result = toolchain.compress(net, recipe, retrain=False, progress=False)
    out = result.network.run(x)[result.network.node(name).outputs[0]]
    assert torch.equal(out, ref[:, torch.sort(order[:3]).values])


def test_bad_structured_recipes_fail_before_training(tmp_path):
    net = small_convnet(tmp_path)
    names = list(net.layers())
    for table in ({"channels": 0}, {"keep": 0.0}):
        with pytest.raises(toolchain.RecipeError, match=r"channels must be|keep must be"):
            toolchain.Recipe.from_dict({"stage": [{"pass": "structured", "layers": {names[0]: table}}]})
    small = toolchain.Recipe.from_dict({"stage": [{"pass": "structured", "layers": {names[0]: {"keep": 0.05}}}]})
    with pytest.raises(toolchain.RecipeError, match="keep none"):
        toolchain.compress(net, small, retrain=False, progress=False)
    last = toolchain.Recipe.from_dict({"stage": [{"pass": "structured", "layers": {names[-1]: {"channels": 5}}}]})
    with pytest.raises(toolchain.RecipeError, match="no single next layer"):
        toolchain.compress(small_convnet(tmp_path), last, retrain=False, progress=False)
