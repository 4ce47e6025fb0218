"""ONNX importer: per-op semantics against onnxruntime, folding/fusion, naming, the Network API,
and errors for bad input. Every case also re-exports with our emitter and re-runs onnxruntime."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from converters import Network, export_onnx, import_onnx, supported_ops
from converters.ops.layers import LocalResponseNorm
from toolchain.errors import ModelFormatError

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    """A checked model; outputs declared without a shape get the inferred one."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 7 if opset <= 15 else 8
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in inferred:
            out.CopyFrom(inferred[out.name])
    onnx.checker.check_model(model)
    return model


def vi(name, shape, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def ort_run(model, feeds):
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check(model, feeds, tol=1e-5, export_opset=17):
    """torch(import(model)) == ORT(model) == ORT(export(import(model)))."""
    ref = ort_run(model, feeds)
    net = import_onnx(model)
    with torch.no_grad():
        out = net(*[torch.from_numpy(feeds[n]) for n in net.input_names])
    outs = out if isinstance(out, tuple) else (out,)
    for r, o in zip(ref, outs):
        assert o.shape == r.shape
        np.testing.assert_allclose(o.numpy(), r, atol=tol, rtol=tol)
    exported = export_onnx(net, opset=max(export_opset, 13))
    for r, e in zip(ref, ort_run(exported, feeds)):
        np.testing.assert_allclose(e, r, atol=tol, rtol=tol)
    return net


def single(op, in_shape, out_shape=None, inits=(), opset=17, extra_inputs=(), **attrs):
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], name="n0", **attrs)
    return make_model([node], [vi("x", in_shape)], [vi("y", out_shape)], inits, opset)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------- Gemm
@pytest.mark.parametrize("alpha,beta,trans_b,c_shape", [
    (1.0, 1.0, 1, (5,)), (0.5, 2.0, 0, (5,)), (1.0, 1.0, 1, (1, 5)), (1.0, 0.5, 1, ()), (2.0, 1.0, 0, None),
])
def test_gemm_becomes_linear(alpha, beta, trans_b, c_shape):
    b = rand(5, 4) if trans_b else rand(4, 5)
    ins = ["x", "B"] + (["C"] if c_shape is not None else [])
    inits = [init("B", b)] + ([init("C", rand(*c_shape))] if c_shape is not None else [])
    node = helper.make_node("Gemm", ins, ["y"], name="fc", alpha=alpha, beta=beta, transB=trans_b)
    net = check(make_model([node], [vi("x", ["N", 4])], [vi("y", ["N", 5])], inits), {"x": rand(3, 4)})
    assert isinstance(net.layers()["fc"], nn.Linear)


@pytest.mark.parametrize("case", ["transA", "full_C", "computed_B"])
def test_gemm_general(case):
    if case == "transA":
        node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], transA=1, alpha=0.7)
        model = make_model([node], [vi("x", [4, 3])], [vi("y", [3, 5])], [init("B", rand(4, 5)), init("C", rand(5))])
        feeds = {"x": rand(4, 3)}
    elif case == "full_C":
        node = helper.make_node("Gemm", ["x", "B", "C"], ["y"], beta=0.3)
        model = make_model([node], [vi("x", [3, 4])], [vi("y", [3, 5])], [init("B", rand(4, 5)), init("C", rand(3, 5))])
        feeds = {"x": rand(3, 4)}
    else:
        node = helper.make_node("Gemm", ["x", "b"], ["y"], transB=1)
        model = make_model([node], [vi("x", [3, 4]), vi("b", [5, 4])], [vi("y", [3, 5])])
        feeds = {"x": rand(3, 4), "b": rand(5, 4)}
    net = check(model, feeds)
    assert not net.layers()


def test_matmul_add_fuses_into_linear_on_3d_input():
    mm = helper.make_node("MatMul", ["x", "enc.fc.weight"], ["h"], name="mm")
    add = helper.make_node("Add", ["b", "h"], ["y"], name="add")
    model = make_model([mm, add], [vi("x", ["N", 7, 4])], [vi("y", ["N", 7, 6])],
                       [init("enc.fc.weight", rand(4, 6)), init("b", rand(6))])
    net = check(model, {"x": rand(2, 7, 4)})
    assert list(net.layers()) == ["enc_fc"] and len(net.nodes) == 1
    assert net.layers()["enc_fc"].bias is not None


# ------------------------------------------------------------------------------------- reshaping
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_flatten_axis(axis):
    check(single("Flatten", [2, 3, 4, 5], None, axis=axis), {"x": rand(2, 3, 4, 5)})


@pytest.mark.parametrize("shape,allowzero", [([0, -1], 0), ([0, 0, -1], 0), ([-1, 20], 1), ([2, 3, 20], 1), ([6, -1], 0)])
def test_reshape(shape, allowzero):
    model = single("Reshape", [2, 3, 4, 5], None, [init("s", np.array(shape, np.int64))], 17, ["s"], allowzero=allowzero)
    check(model, {"x": rand(2, 3, 4, 5)})


def test_reshape_allowzero_keeps_literal_zero():
    model = single("Reshape", [0, 3], None, [init("s", np.array([3, 0], np.int64))], 17, ["s"], allowzero=1)
    check(model, {"x": np.zeros((0, 3), np.float32)})


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_transpose(opset):
    if opset < 13:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0, -1]),
                 helper.make_node("Transpose", ["u"], ["t"], perm=[1, 0, 3, 2, 4]),
                 helper.make_node("Squeeze", ["t"], ["y"], axes=[1, 4])]
        inits = []
    else:
        nodes = [helper.make_node("Unsqueeze", ["x", "a1"], ["u"]),
                 helper.make_node("Transpose", ["u"], ["t"]),
                 helper.make_node("Squeeze", ["t", "a2"], ["y"])]
        inits = [init("a1", np.array([0, -1], np.int64)), init("a2", np.array([0, 4], np.int64))]
    check(make_model(nodes, [vi("x", [2, 3, 4])], [vi("y", None)], inits, opset), {"x": rand(2, 3, 4)})


@pytest.mark.parametrize("opset,legacy_semantics", [(11, True), (13, False)])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_axis_semantics(op, opset, legacy_semantics):
    net = check(single(op, [2, 3, 4, 5], [2, 3, 4, 5], opset=opset, axis=1), {"x": rand(2, 3, 4, 5)})
    assert net.ops["n0"].legacy is legacy_semantics


def test_softmax_default_axis_changes_at_opset_13():
    for opset in (11, 13):
        check(single("Softmax", [2, 3, 4], [2, 3, 4], opset=opset), {"x": rand(2, 3, 4)})


def test_slice_gather_concat_cast():
    nodes = [
        helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]),
        helper.make_node("Gather", ["s", "idx"], ["g"], axis=1),
        helper.make_node("Concat", ["g", "g"], ["c"], axis=0),
        helper.make_node("Cast", ["c"], ["i"], to=TensorProto.INT32),
        helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT),
    ]
    inits = [init("st", np.array([-1, 0], np.int64)), init("en", np.array([-100, 9], np.int64)),
             init("ax", np.array([0, 2], np.int64)), init("sp", np.array([-2, 3], np.int64)),
             init("idx", np.array([[2, -1], [0, 0]], np.int64))]
    check(make_model(nodes, [vi("x", [5, 4, 9])], [vi("y", None)], inits), {"x": rand(5, 4, 9) * 10})


def test_slice_opset9_attributes():
    node = helper.make_node("Slice", ["x"], ["y"], starts=[1, -3], ends=[1000, -1], axes=[0, 2])
    check(make_model([node], [vi("x", [4, 3, 6])], [vi("y", None)], opset=9), {"x": rand(4, 3, 6)})


@pytest.mark.parametrize("opset,mode", [(11, "constant"), (11, "reflect"), (11, "edge"), (18, "constant"), (2, "constant")])
def test_pad(opset, mode):
    if opset < 11:
        model = single("Pad", [1, 2, 4, 5], None, opset=opset, mode=mode, pads=[0, 0, 1, 2, 0, 0, 2, 0], value=1.5)
    elif opset < 18:
        inits = [init("p", np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)), init("v", np.array(-2.0, np.float32))]
        model = single("Pad", [1, 2, 4, 5], None, inits, opset, ["p", "v"] if mode == "constant" else ["p"], mode=mode)
    else:
        inits = [init("p", np.array([1, 0, 2, -1], np.int64)), init("a", np.array([2, 3], np.int64))]
        model = single("Pad", [1, 2, 4, 5], None, inits, opset, ["p", "", "a"], mode=mode)
    check(model, {"x": rand(1, 2, 4, 5)})


@pytest.mark.parametrize("opset", [6, 11, 13])
def test_clip(opset):
    if opset < 11:
        model = single("Clip", [3, 4], [3, 4], opset=opset, min=-0.5, max=0.25)
    else:
        model = single("Clip", [3, 4], [3, 4], [init("hi", np.array(0.3, np.float32))], opset, ["", "hi"])
    check(model, {"x": rand(3, 4)})


def test_elementwise_with_constants_and_broadcasting():
    nodes = [helper.make_node("Sub", ["x", "mean"], ["a"]), helper.make_node("Mul", ["a", "scale"], ["b"]),
             helper.make_node("Div", ["b", "two"], ["c"]), helper.make_node("Pow", ["c", "two"], ["d"]),
             helper.make_node("Add", ["d", "x"], ["e"]), helper.make_node("Max", ["e", "x", "a"], ["f"]),
             helper.make_node("Sqrt", ["two"], ["s2"]), helper.make_node("Where", ["mask", "f", "s2"], ["y"])]
    inits = [init("mean", rand(3, 1, 1)), init("scale", np.array(255.0, np.float32)), init("two", np.array(2.0, np.float32)),
             init("mask", RNG.random((4, 5)) > 0.5)]
    check(make_model(nodes, [vi("x", ["N", 3, 4, 5])], [vi("y", None)], inits), {"x": rand(2, 3, 4, 5)}, tol=1e-3)


@pytest.mark.parametrize("fmod", [0, 1])
def test_mod_and_range(fmod):
    """Mod (divisor's sign for fmod=0, dividend's for fmod=1) on a run-time tensor, and Range over constants
    (folded), as the hashed-layer export uses them."""
    nodes = [helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=F32),
             helper.make_node("Add", ["x", "rf"], ["s"]),
             helper.make_node("Mod", ["s", "m"], ["y"], fmod=fmod)]
    inits = [init("start", np.array(-3.0, np.float32)), init("limit", np.array(7.0, np.float32)),
             init("delta", np.array(2.5, np.float32)), init("m", np.array(-1.75, np.float32))]
    if fmod == 0:  # integer-only in ONNX
        nodes[1:] = [helper.make_node("Add", ["x", "r"], ["s"]), helper.make_node("Mod", ["s", "m"], ["y"])]
        inits = [init("start", np.array(-5, np.int64)), init("limit", np.array(9, np.int64)),
                 init("delta", np.array(3, np.int64)), init("m", np.array(-4, np.int64))]
        x = RNG.integers(-20, 20, (2, 5)).astype(np.int64)
        dtype = onnx.TensorProto.INT64
    else:
        x = rand(2, 4) * 5
        dtype = F32
    check(make_model(nodes, [vi("x", ["N", x.shape[1]], dtype)], [vi("y", ["N", x.shape[1]], dtype)], inits), {"x": x})


def test_old_style_broadcast_with_axis():
    node = helper.make_node("Add", ["x", "b"], ["y"], broadcast=1, axis=1)
    b = rand(3)
    model = make_model([node], [vi("x", [2, 3, 4, 5])], [vi("y", [2, 3, 4, 5])], [init("b", b)], opset=6)
    x = rand(2, 3, 4, 5)
    expected = x + b.reshape(3, 1, 1)  # onnxruntime no longer runs opset 6 Add
    net = import_onnx(model)
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(ort_run(export_onnx(net), {"x": x})[0], expected, atol=1e-6)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax"])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce(op, opset):
    axes_as_input = opset >= 18 or (op == "ReduceSum" and opset >= 13)
    if axes_as_input:
        model = single(op, [2, 3, 4], None, [init("a", np.array([1, -1], np.int64))], opset, ["a"], keepdims=0)
    else:
        model = single(op, [2, 3, 4], None, opset=opset, axes=[1, -1], keepdims=0)
    check(model, {"x": rand(2, 3, 4)})


def test_expand_and_constant_of_shape():
    nodes = [helper.make_node("Expand", ["x", "shape"], ["e"]),
             helper.make_node("ConstantOfShape", ["shape2"], ["c"], value=helper.make_tensor("v", F32, [1], [0.5])),
             helper.make_node("Add", ["e", "c"], ["y"])]
    inits = [init("shape", np.array([2, 1, 4], np.int64)), init("shape2", np.array([4], np.int64))]
    net = check(make_model(nodes, [vi("x", [3, 1])], [vi("y", None)], inits), {"x": rand(3, 1)})
    assert [n.op_type for n in net.nodes] == ["Expand", "Add"]  # ConstantOfShape was folded


# ------------------------------------------------------------------------------------- pooling
POOL_CASES = [
    dict(kernel_shape=[3, 3], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 2, 1]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[2, 3], pads=[1, 1, 1, 1], ceil_mode=1),
    dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
    dict(kernel_shape=[4, 4], strides=[1, 1], pads=[3, 3, 3, 3]),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[4, 3], strides=[3, 2], auto_pad="SAME_LOWER"),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID"),
]


@pytest.mark.parametrize("attrs", POOL_CASES)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool0", "AveragePool1"])
def test_pool_2d_matches_onnxruntime(op, attrs):
    attrs = dict(attrs)
    if op.startswith("AveragePool"):
        attrs["count_include_pad"] = int(op[-1])
        op = "AveragePool"
    check(single(op, [2, 3, 10, 11], None, opset=19, **attrs), {"x": rand(2, 3, 10, 11)})


def test_maxpool_dilations_and_1d_3d():
    check(single("MaxPool", [1, 2, 13, 12], None, kernel_shape=[3, 2], dilations=[2, 3], pads=[1, 1, 2, 0]),
          {"x": rand(1, 2, 13, 12)})
    check(single("MaxPool", [2, 3, 17], None, kernel_shape=[4], strides=[3], ceil_mode=1), {"x": rand(2, 3, 17)})
    check(single("AveragePool", [1, 1, 6, 5, 4], None, kernel_shape=[5, 1, 1], pads=[2, 0, 0, 2, 0, 0],
                 count_include_pad=1), {"x": rand(1, 1, 6, 5, 4)})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool(op):
    check(single(op, ["N", 3, 5, 6], ["N", 3, 1, 1]), {"x": rand(2, 3, 5, 6)})


# ------------------------------------------------------------------------------------- conv / norm
@pytest.mark.parametrize("attrs,w_shape,x_shape", [
    (dict(group=2, pads=[1, 1, 1, 1], strides=[2, 2]), (8, 2, 3, 3), (2, 4, 9, 9)),
    (dict(pads=[0, 1, 2, 1], dilations=[2, 1]), (5, 3, 3, 3), (1, 3, 10, 8)),
    (dict(auto_pad="SAME_UPPER", strides=[2, 2]), (4, 3, 4, 4), (1, 3, 9, 10)),
    (dict(auto_pad="SAME_LOWER"), (4, 3, 2, 2), (1, 3, 7, 7)),
    (dict(auto_pad="VALID", strides=[3]), (4, 3, 3), (2, 3, 11)),
])
def test_conv(attrs, w_shape, x_shape):
    inits = [init("c.weight", rand(*w_shape)), init("c.bias", rand(w_shape[0]))]
    node = helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["y"], name="conv", **attrs)
    net = check(make_model([node], [vi("x", list(x_shape))], [vi("y", None)], inits), {"x": rand(*x_shape)}, tol=1e-4)
    conv = net.layers()["c"]
    assert isinstance(conv, (nn.Conv1d, nn.Conv2d)) and type(conv) in (nn.Conv1d, nn.Conv2d)
    assert conv.weight.requires_grad


def lrn_reference(x, size, alpha, beta, bias):
    """The ONNX spec's formula, written out."""
    c = x.shape[1]
    sq = np.zeros_like(x)
    for i in range(c):
        lo, hi = max(0, i - (size - 1) // 2), min(c - 1, i + int(np.ceil((size - 1) / 2)))
        sq[:, i] = (x[:, lo:hi + 1] ** 2).sum(axis=1)
    return x / (bias + alpha / size * sq) ** beta


@pytest.mark.parametrize("size", [5, 3, 4])
def test_lrn_matches_spec(size):
    x = rand(2, 7, 5, 5) * 3
    model = single("LRN", ["N", 7, 5, 5], None, size=size, alpha=0.2, beta=0.75, bias=2.0)
    if size % 2:  # onnxruntime implements odd sizes only
        net = check(model, {"x": x})
    else:
        net = import_onnx(model)
    assert isinstance(net.ops["n0"], LocalResponseNorm)
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), lrn_reference(x, size, 0.2, 0.75, 2.0), atol=1e-5)


def test_batchnorm_eval_semantics():
    c = 4
    inits = [init("s", rand(c)), init("b", rand(c)), init("m", rand(c)), init("v", RNG.random(c).astype(np.float32) + 0.5)]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3)
    net = check(make_model([node], [vi("x", ["N", c, 3, 3])], [vi("y", None)], inits), {"x": rand(2, c, 3, 3)})
    assert isinstance(net.ops["bn"], nn.BatchNorm2d)


@pytest.mark.parametrize("opset", [7, 12, 13])
def test_dropout_ratio_from_attribute_or_input(opset):
    if opset < 12:
        node = helper.make_node("Dropout", ["x"], ["y"], name="drop", ratio=0.3)
        inits = []
    else:
        node = helper.make_node("Dropout", ["x", "r", "t"] if opset >= 13 else ["x", "r"], ["y"], name="drop")
        inits = [init("r", np.array(0.3, np.float32))] + ([init("t", np.array(False))] if opset >= 13 else [])
    net = check(make_model([node], [vi("x", ["N", 8])], [vi("y", None)], inits, opset), {"x": rand(3, 8)})
    assert isinstance(net.ops["drop"], nn.Dropout) and net.ops["drop"].p == pytest.approx(0.3)
    net.train()
    out = net(torch.ones(200, 8))
    assert 0.1 < (out == 0).float().mean() < 0.5  # dropout is active when training


# ------------------------------------------------------------------------------------- folding
def test_old_exporter_shape_chain_is_folded_and_batch_stays_dynamic():
    """x.view(x.size(0), -1) as old exporters wrote it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Identity", ["flat"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", ["N", 2, 3])], [vi("y", ["N", 6])], [init("minus1", np.array([-1], np.int64))], 11)
    net = check(model, {"x": rand(4, 2, 3)})
    assert [n.op_type for n in net.nodes] == ["Reshape", "Identity"]
    assert net.ops[net.nodes[0].name].shape == [0, -1]


def test_if_with_constant_condition_is_inlined():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [vi("t", None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", None)])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
             helper.make_node("Equal", ["c", "three"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inits = [init("one", np.array(1, np.int64)), init("three", np.array(3, np.int64))]
    net = check(make_model(nodes, [vi("x", ["N", 3])], [vi("y", None)], inits, 11), {"x": rand(2, 3)})
    assert [n.op_type for n in net.nodes] == ["Relu", "Identity"]


def test_if_with_runtime_condition_is_rejected():
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [vi("t", None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", None)], [init("zero", np.array(0, np.float32))], 11)
    with pytest.raises(ModelFormatError, match="If node 'branch'.*condition"):
        import_onnx(model)


def test_fixed_batch_model_becomes_dynamic():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["f"]),
             helper.make_node("Gemm", ["f", "W", "b"], ["y"], name="fc", transB=1)]
    inits = [init("s", np.array([1, 12], np.int64)), init("W", rand(5, 12)), init("b", rand(5))]
    model = make_model(nodes, [vi("x", [1, 3, 4])], [vi("y", [1, 5])], inits)
    net = import_onnx(model)
    assert net.input_shapes["x"] == ["N", 3, 4]
    x = rand(3, 3, 4)
    per_sample = np.concatenate([ort_run(model, {"x": x[i:i + 1]})[0] for i in range(3)])
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), per_sample, atol=1e-5)
    np.testing.assert_allclose(ort_run(export_onnx(net), {"x": x})[0], per_sample, atol=1e-5)


# ------------------------------------------------------------------------------------- naming, API
def test_layer_names_from_initializers_and_nodes():
    nodes = [helper.make_node("Conv", ["x", "conv1_w_0", "conv1_b_0"], ["c"], name="conv_node", kernel_shape=[3, 3]),
             helper.make_node("Flatten", ["c"], ["f"], name="/flatten/Flatten"),
             helper.make_node("Gemm", ["f", "features.fc.weight", "features.fc.bias"], ["g"], name="/fc/Gemm", transB=1),
             helper.make_node("Gemm", ["g", "W_auto"], ["h"], name="/head/Gemm", transB=1),
             helper.make_node("Gemm", ["h", "val_3"], ["y"], name="node_linear", transB=1)]
    inits = [init("conv1_w_0", rand(2, 1, 3, 3)), init("conv1_b_0", rand(2)), init("features.fc.weight", rand(4, 8)),
             init("features.fc.bias", rand(4)), init("W_auto", rand(3, 4)), init("val_3", rand(2, 3))]
    net = import_onnx(make_model(nodes, [vi("x", ["N", 1, 4, 4])], [vi("y", ["N", 2])], inits))
    # suffix-stripped initializer names; else the legacy exporter's module path; else dynamo's node name
    assert list(net.layers()) == ["conv1", "features_fc", "head", "linear"]
    assert list(net.ops) == ["conv1", "flatten", "features_fc", "head", "linear"]


def test_graph_module_navigation_and_replace_layer():
    nodes = [helper.make_node("Gemm", ["x", "ip1.weight", "ip1.bias"], ["a"], name="/ip1/Gemm", transB=1),
             helper.make_node("Relu", ["a"], ["r"], name="/relu1/Relu"),
             helper.make_node("Dropout", ["r", "ratio"], ["d"], name="/drop1/Dropout"),
             helper.make_node("Gemm", ["d", "ip2.weight", "ip2.bias"], ["y"], name="/ip2/Gemm", transB=1)]
    inits = [init("ip1.weight", rand(6, 4)), init("ip1.bias", rand(6)), init("ratio", np.array(0.5, np.float32)),
             init("ip2.weight", rand(3, 6)), init("ip2.bias", rand(3))]
    net = import_onnx(make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])], inits))
    assert list(net.layers()) == ["ip1", "ip2"]
    assert net.next_layers("ip1") == ["ip2"] and net.previous_layers("ip2") == ["ip1"]
    assert [n.name for n in net.nodes_after("ip1")] == ["relu1", "drop1"]
    drops = net.dropouts_after("ip1")
    assert len(drops) == 1 and drops[0] is net.ops["drop1"] and net.dropouts_after("ip2") == []
    assert net.producer("a").name == "ip1" and [n.name for n in net.consumers("r")] == ["drop1"]
    assert net.producer("x") is None

    x = torch.randn(5, 4)
    with torch.no_grad():
        before = net(x)
    clone = copy.deepcopy(net)
    old = net.layers()["ip2"]
    new = nn.Linear(6, 3)
    new.load_state_dict(old.state_dict())
    net.replace_layer("ip2", new)
    assert net.layers()["ip2"] is new
    with torch.no_grad():
        torch.testing.assert_close(net(x), before)
        torch.testing.assert_close(clone(x), before)
    with pytest.raises(KeyError):
        net.replace_layer("nope", new)

    fresh = import_onnx(make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])], inits))
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(clone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), before)


def test_training_updates_weights_through_all_ops():
    nodes = [helper.make_node("Conv", ["x", "c.weight", "c.bias"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("LRN", ["c"], ["l"], size=3),
             helper.make_node("MaxPool", ["l"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1)]
    inits = [init("c.weight", rand(2, 1, 3, 3)), init("c.bias", rand(2)), init("fc.weight", rand(3, 2 * 3 * 3)),
             init("fc.bias", rand(3))]
    net = import_onnx(make_model(nodes, [vi("x", ["N", 1, 5, 5])], [vi("y", ["N", 3])], inits))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    loss = nn.functional.cross_entropy(net(torch.randn(4, 1, 5, 5)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    for name in ("ops.c.weight", "ops.c.bias", "ops.fc.weight", "ops.fc.bias"):
        assert not torch.equal(before[name], net.state_dict()[name]), name


# ------------------------------------------------------------------------------------- bad input
def _lenet_like_bytes():
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    return make_model([node], [vi("x", ["N", 4])], [vi("y", ["N", 2])], [init("W", rand(2, 4))]).SerializeToString()


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(_lenet_like_bytes()[:-20])
    with pytest.raises(ModelFormatError, match="cut.onnx"):
        import_onnx(path)


def test_non_onnx_bytes(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(ModelFormatError, match="notes.onnx: not a"):
        import_onnx(path)
    with pytest.raises(ModelFormatError, match="no such file"):
        import_onnx(tmp_path / "missing.onnx")


def test_dangling_input_is_named():
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", [2])], [vi("y", [2])])
    model.graph.node.append(helper.make_node("Add", ["y", "ghost"], ["z"], name="adder"))
    model.graph.output[0].name = "z"
    with pytest.raises(ModelFormatError, match="'adder'.*'ghost'"):
        import_onnx(model.SerializeToString())


def test_no_outputs():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    del model.graph.output[:]
    with pytest.raises(ModelFormatError, match="no outputs"):
        import_onnx(model)


def test_checker_rejection():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])])
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 1.0))  # Relu has no attributes
    with pytest.raises(ModelFormatError, match="checker"):
        import_onnx(model)


def test_unsupported_op_names_op_node_and_opset():
    node = helper.make_node("Einsum", ["x", "x"], ["y"], name="mix", equation="ij,ij->ij")
    model = make_model([node], [vi("x", [2, 2])], [vi("y", [2, 2])], opset=14)
    with pytest.raises(ModelFormatError) as info:
        import_onnx(model)
    msg = str(info.value)
    assert "'Einsum'" in msg and "'mix'" in msg and "opset 14" in msg and "Conv, " in msg and "\n" not in msg
    assert "Gemm" in supported_ops() and "LRN" in supported_ops()


def test_graph_module_is_a_module():
    net = import_onnx(_lenet_like_bytes())
    assert isinstance(net, Network) and isinstance(net, nn.Module)
    assert net.input_shapes == {"x": ["N", 4]} and net.output_names == ["y"]


@pytest.mark.parametrize("module", [nn.Flatten(1, 2), nn.Flatten(), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                                    nn.AvgPool2d(2, 2, 1), nn.Softmax(dim=1)], ids=lambda m: type(m).__name__)
def test_export_of_plain_torch_modules_swapped_in(module):
    """Passes may put torch modules into the graph; the output shape declared on export follows the module."""
    model = single("Relu", ["N", 2, 7, 7], ["N", 2, 7, 7])
    net = import_onnx(model)
    net.ops["n0"] = module
    x = torch.randn(3, 2, 7, 7)
    exported = export_onnx(net)
    np.testing.assert_allclose(ort_run(exported, {"x": x.numpy()})[0], module(x).numpy(), atol=1e-6)
    assert exported.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
