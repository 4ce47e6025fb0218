"""Round trips on the zoo models: ONNX written by torch's exporters (dynamo; legacy opsets 9/11/13/17) and
an ONNX-model-zoo style AlexNet (bvlcalexnet-12 layout, built here) -> import -> torch forward == onnxruntime
on the original -> our export -> onnxruntime on it == the original."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from converters import export_onnx, import_onnx, torch_to_onnx
from converters.ops.layers import LocalResponseNorm
from toolchain.zoo import create_model, get_model_spec

LAYERS = {
    "lenet-300-100": (["ip1", "ip2", "ip3"], nn.Linear),
    "lenet-5": (["conv1", "conv2", "ip1", "ip2"], None),
    "alexnet": (["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"], None),
}
FLAVOURS = [(m, f) for m in ("lenet-300-100", "lenet-5") for f in ("dynamo", 9, 11, 13, 17)] + \
    [("alexnet", "dynamo"), ("alexnet", 11)]


def ort_session(model):
    src = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def close(actual, expected, tol=1e-5):
    """max |a - e| <= tol, relative to the output's scale when that exceeds 1 (AlexNet's logits)."""
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(actual - expected).max())
    assert err <= tol * scale, f"max abs diff {err:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """ONNX files written by torch's exporters, made once per (model, flavour) on first use."""
    cache = {}

    def get(name, flavour):
        if (name, flavour) not in cache:
            torch.manual_seed(0)
            model = create_model(name).eval()
            x = torch.rand(2, *get_model_spec(name).input_shape)
            path = tmp_path_factory.mktemp("zoo") / f"{name}-{flavour}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if flavour == "dynamo":
                    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False, input_names=["data"],
                                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("N")},))
                else:
                    torch.onnx.export(model, (x,), path, dynamo=False, opset_version=flavour, input_names=["data"],
                                      output_names=["logits"], dynamic_axes={"data": {0: "N"}, "logits": {0: "N"}})
            cache[name, flavour] = (model, path)
        return cache[name, flavour]

    return get


@pytest.mark.parametrize("name,flavour", FLAVOURS)
def test_zoo_model_round_trip(exported, tmp_path, name, flavour):
    torch_model, path = exported(name, flavour)
    net = import_onnx(path)

    names, cls = LAYERS[name]
    layers = net.layers()
    assert list(layers) == names
    for lname, layer in layers.items():
        expected_cls = cls or (nn.Conv2d if lname.startswith("conv") else nn.Linear)
        assert type(layer) is expected_cls, lname
        assert layer.weight.requires_grad and layer.bias.requires_grad
        torch.testing.assert_close(layer.weight.data, dict(torch_model.named_children())[lname].weight.data)
    if name == "alexnet":  # the exporters' decomposed LocalResponseNorm is fused back, If/Shape chains folded
        assert [type(m) for m in net.ops.values()].count(LocalResponseNorm) == 2
        assert not {"If", "Shape", "Pad", "AveragePool"} & {n.op_type for n in net.nodes}
        assert [conv.groups for conv in list(layers.values())[:5]] == [1, 2, 1, 2, 2]

    x = np.random.default_rng(1).random((3, *get_model_spec(name).input_shape), dtype=np.float32)  # batch 3: dynamic
    ref = ort_session(str(path)).run(None, {"data": x})[0]
    with torch.no_grad():
        close(net(torch.from_numpy(x)).numpy(), ref)
        close(torch_model(torch.from_numpy(x)).numpy(), ref)

    out = tmp_path / "exported.onnx"
    model = export_onnx(net, out)  # checked with onnx.checker (full_check) before it is written
    close(ort_session(str(out)).run(None, {"data": x})[0], ref)
    inits = {t.name for t in model.graph.initializer}
    assert {f"{n}.weight" for n in names} | {f"{n}.bias" for n in names} <= inits
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [n.name for n in gemms] == [n for n in names if not n.startswith("conv")]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_training_step_changes_imported_weights(exported):
    _, path = exported("lenet-5", "dynamo")
    net = import_onnx(path)
    before = {k: v.clone() for k, v in net.named_parameters()}
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(net(torch.rand(8, 1, 28, 28)), torch.arange(8))
    loss.backward()
    opt.step()
    changed = [k for k, v in net.named_parameters() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(before)  # every weight and bias got a gradient


# ---------------------------------------------------------------------------- ONNX model zoo style
def bvlc_alexnet_like(opset: int = 12, flatten: str = "const", seed: int = 0) -> onnx.ModelProto:
    """The layout of the ONNX model zoo's bvlcalexnet-12, with fewer channels: fixed batch 1, weights named
    conv1_w_0 / fc6_b_0 and also listed as graph inputs, LRN, grouped convs, padded MaxPool, Gemm transB=1,
    Dropout, Softmax; plus Constant/Sub/Mul/Identity preprocessing and an old-exporter Shape chain."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name, shape):
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), f"{name}_w_0"))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape[0]) * 0.1).astype(np.float32), f"{name}_b_0"))
        return [f"{name}_w_0", f"{name}_b_0"]

    def const(name, value):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name)))
        return name

    def conv(name, x, shape, group=1, pads=(0, 0, 0, 0), strides=(1, 1)):
        nodes.append(helper.make_node("Conv", [x] + weight(name, shape), [f"{name}_1"], name=name, group=group,
                                      kernel_shape=list(shape[2:]), pads=list(pads), strides=list(strides)))
        nodes.append(helper.make_node("Relu", [f"{name}_1"], [f"{name}_2"], name=f"relu_{name}"))
        return f"{name}_2"

    def lrn(name, x):
        nodes.append(helper.make_node("LRN", [x], [name], name=name, size=5, alpha=1e-4, beta=0.75, bias=1.0))
        return name

    def pool(name, x, pads=(0, 0, 0, 0)):
        nodes.append(helper.make_node("MaxPool", [x], [name], name=name, kernel_shape=[3, 3], strides=[2, 2], pads=list(pads)))
        return name

    def dropout(name, x, with_training_mode=False):
        if opset < 12:
            nodes.append(helper.make_node("Dropout", [x], [name], name=name, ratio=0.5))
        else:
            ins = [x, const(f"{name}_ratio", np.array(0.5, np.float32))]
            if with_training_mode:
                ins.append(const(f"{name}_mode", np.array(False)))
            nodes.append(helper.make_node("Dropout", ins, [name], name=name))
        return name

    def fc(name, x, shape):
        nodes.append(helper.make_node("Gemm", [x] + weight(name, shape), [name], name=name, transB=1))
        return name

    mean = const("mean", (rng.random((1, 3, 1, 1)) * 0.5).astype(np.float32))
    nodes.append(helper.make_node("Sub", ["data_0", mean], ["centered"]))
    nodes.append(helper.make_node("Mul", ["centered", const("scale", np.array(2.0, np.float32))], ["scaled"]))
    nodes.append(helper.make_node("Identity", ["scaled"], ["input"]))
    x = pool("pool1", lrn("norm1", conv("conv1", "input", (16, 3, 11, 11), strides=(4, 4))), pads=(0, 0, 1, 1))
    x = pool("pool2", lrn("norm2", conv("conv2", x, (32, 8, 5, 5), group=2, pads=(2, 2, 2, 2))))
    x = conv("conv3", x, (48, 32, 3, 3), pads=(1, 1, 1, 1))
    x = conv("conv4", x, (48, 24, 3, 3), group=2, pads=(1, 1, 1, 1))
    x = pool("pool5", conv("conv5", x, (32, 24, 3, 3), group=2, pads=(1, 1, 1, 1)))
    if flatten == "const":
        target = "OC2_DUMMY_1"
        inits.append(numpy_helper.from_array(np.array([1, 32 * 6 * 6], np.int64), target))
    else:  # x.view(x.size(0), -1) as the old exporters wrote it
        nodes.append(helper.make_node("Shape", [x], ["pool5_shape"]))
        nodes.append(helper.make_node("Gather", ["pool5_shape", const("zero", np.array(0, np.int64))], ["batch"], axis=0))
        nodes.append(helper.make_node("Unsqueeze", ["batch"], ["batch_1d"], axes=[0]) if opset < 13 else
                     helper.make_node("Unsqueeze", ["batch", const("axes0", np.array([0], np.int64))], ["batch_1d"]))
        nodes.append(helper.make_node("Concat", ["batch_1d", const("minus1", np.array([-1], np.int64))], ["target"], axis=0))
        target = "target"
    nodes.append(helper.make_node("Reshape", [x, target], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Relu", [fc("fc6", "flat", (64, 1152))], ["fc6_r"], name="relu6"))
    x = dropout("drop6", "fc6_r")
    nodes.append(helper.make_node("Relu", [fc("fc7", x, (64, 64))], ["fc7_r"], name="relu7"))
    x = dropout("drop7", "fc7_r", with_training_mode=True)
    nodes.append(helper.make_node("Softmax", [fc("fc8", x, (10, 64))], ["prob_1"], name="prob", axis=1))

    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 224, 224])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]  # old style
    graph = helper.make_graph(nodes, "bvlcalexnet-like", inputs,
                              [helper.make_tensor_value_info("prob_1", TensorProto.FLOAT, [1, 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset,flatten,export_opset", [(12, "const", 17), (9, "shape_chain", 13), (13, "shape_chain", 17)])
def test_model_zoo_style_alexnet(tmp_path, opset, flatten, export_opset):
    model = bvlc_alexnet_like(opset, flatten)
    path = tmp_path / "bvlcalexnet.onnx"
    path.write_bytes(model.SerializeToString())
    net = import_onnx(path)

    assert net.input_names == ["data_0"] and net.input_shapes["data_0"] == ["N", 3, 224, 224]
    assert list(net.layers()) == ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    assert [d.p for d in net.dropouts_after("fc6")] == [0.5] and len(net.dropouts_after("fc7")) == 1
    assert isinstance(net.ops["norm1"], LocalResponseNorm)
    assert "Shape" not in {n.op_type for n in net.nodes}  # folded (batch copied with 0)

    x = np.random.default_rng(2).random((3, 3, 224, 224), dtype=np.float32)
    sess = ort_session(model)
    ref = np.concatenate([sess.run(None, {"data_0": x[i:i + 1]})[0] for i in range(3)])  # the file has batch 1
    with torch.no_grad():
        close(net(torch.from_numpy(x)).numpy(), ref)
    out = tmp_path / "exported.onnx"
    export_onnx(net, out, opset=export_opset)
    close(ort_session(str(out)).run(None, {"data_0": x})[0], ref)
    net.train()
    assert net(torch.from_numpy(x[:2])).shape == (2, 10)


def test_model_zoo_style_misc_ops(tmp_path):
    """BatchNormalization, AveragePool, GlobalAveragePool, Squeeze, Cast, Transpose + MatMul + Add (-> Linear)."""
    rng = np.random.default_rng(3)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("conv_W", f(8, 3, 3, 3)), ("bn_scale", f(8)), ("bn_B", f(8)), ("bn_mean", f(8)),
        ("bn_var", rng.random(8).astype(np.float32) + 0.5), ("head_W", f(5, 8)), ("head_B", f(5))]]
    nodes = [
        helper.make_node("Conv", ["x", "conv_W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("AveragePool", ["r"], ["a"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Squeeze", ["g"], ["s"], axes=[2, 3]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["head_W"], ["head_Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["sf", "head_Wt"], ["m"], name="head"),
        helper.make_node("Add", ["m", "head_B"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "misc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    net = import_onnx(model)
    assert list(net.layers()) == ["conv", "head"] and isinstance(net.layers()["head"], nn.Linear)
    assert isinstance(net.ops["bn"], nn.BatchNorm2d)
    x = rng.random((2, 3, 9, 9), dtype=np.float32)
    ref = ort_session(model).run(None, {"x": x})[0]
    with torch.no_grad():
        close(net(torch.from_numpy(x)).numpy(), ref)
    close(ort_session(export_onnx(net)).run(None, {"x": x})[0], ref)


# ---------------------------------------------------------------------------- torch_to_onnx
def test_torch_to_onnx_writes_one_named_file(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet-300-100").eval()
    path = tmp_path / "lenet.onnx"
    proto = torch_to_onnx(model, torch.zeros(1, 1, 28, 28), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx"]  # self-contained, no temp left
    assert {"ip1.weight", "ip1.bias", "ip3.weight"} <= {t.name for t in proto.graph.initializer}
    assert proto.graph.input[0].name == "data" and proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = torch.rand(5, 1, 28, 28)
    y = ort_session(str(path)).run(None, {"data": x.numpy()})[0]
    with torch.no_grad():
        close(y, model(x).numpy())
    assert list(import_onnx(path).layers()) == ["ip1", "ip2", "ip3"]


def test_torch_to_onnx_names_transposed_weights():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3, bias=False)).eval()
    proto = torch_to_onnx(model, torch.zeros(2, 5, 8))  # 3-D input: the exporter writes MatMul with W^T
    assert {"0.weight.T", "0.bias", "2.weight.T"} <= {t.name for t in proto.graph.initializer}
    net = import_onnx(proto)
    assert list(net.layers()) == ["0", "2"]
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
