"""Ops fused into the layer ops' output pass by the fast form (toolchain/kernels/graph.py):

- SparseConv's max pool (attribute max_pool): the same results as the convolution followed by torch's
  max_pool2d, on every ISA path and algorithm of this CPU, every batch size, any thread count; a NaN in
  a window gives NaN; only the MaxPools the output pass computes exactly are fused;
- the layer ops' ReLU (attribute activation="Relu": SparseLinear, the packed linears, SparseConv):
  bitwise the unfused op followed by onnxruntime's Relu, NaN and -0 included.

Fused files read back as the standard layers. Bad attributes are in test_kernels.py's subprocess cases."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper

import toolchain
from test_kernels import (ISAS, _dense_conv, _poison, assert_close, export_and_run_both_forms, make_session,
                          random_sparse, torch_conv)
from toolchain import kernels
from toolchain.kernels.graph import fuse_max_pools, fuse_relus, to_fast_ops
from toolchain.measure import measure
from toolchain.methods.prune import csr
from toolchain.methods.prune.layers import masked_from_dense
from toolchain.methods.quantize import packed

ALGOS = ["im2col", "direct", "batch", None]  # None: the automatic choice


@pytest.fixture(scope="module")
def lib():
    return kernels.library_path(build=True)


def pool_ref(y: np.ndarray, k) -> np.ndarray:
    """Max pool, window = strides = k, floor mode, NaN propagating (torch's max_pool2d), in float64."""
    return F.max_pool2d(torch.from_numpy(np.ascontiguousarray(y, np.float64)), tuple(k), tuple(k)).numpy()


# conv geometry and pool window; several lane tiles, odd windows, windows that leave rows/columns out
CASES = [
    dict(n=3, c=1, m=20, hw=(28, 28), k=(5, 5), strides=(1, 1), pads=(0, 0, 0, 0), group=1, pool=(2, 2), density=0.6),
    dict(n=2, c=6, m=10, hw=(13, 9), k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), group=2, pool=(3, 2), density=0.4),
    dict(n=70, c=4, m=6, hw=(9, 11), k=(3, 2), strides=(1, 2), pads=(1, 0, 2, 1), group=1, pool=(2, 3), density=0.5),
    dict(n=17, c=3, m=5, hw=(8, 8), k=(3, 3), strides=(2, 1), pads=(1, 1, 1, 1), group=1, pool=(1, 1), density=0.3),
    dict(n=5, c=2, m=4, hw=(7, 7), k=(2, 2), strides=(1, 1), pads=(0, 0, 0, 0), group=1, pool=(6, 6), density=1.0),
]


def _case_model(c, rng, bias=True):
    wt = random_sparse(rng, (c["m"], c["c"] // c["group"], *c["k"]), c["density"])
    b = rng.standard_normal(c["m"]).astype(np.float32) if bias else None
    kw = dict(input_hw=c["hw"], strides=c["strides"], pads=c["pads"], group=c["group"])
    return wt, b, csr.make_sparse_conv_model(wt, b, max_pool=c["pool"], **kw), csr.make_sparse_conv_model(wt, b, **kw)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("isa", ISAS)
def test_fused_pool_is_the_pool_of_the_conv(lib, isa, algo):
    for i, c in enumerate(CASES):
        rng = np.random.default_rng(200 + i)
        wt, b, fused, plain = _case_model(c, rng, bias=i % 2 == 0)
        x = rng.standard_normal((c["n"], c["c"], *c["hw"])).astype(np.float32)
        y = make_session(fused, lib, threads=1 + i % 2, isa=isa, conv=algo).run(None, {"X": x})[0]
        ref = pool_ref(torch_conv(x, wt, b, c["strides"], c["pads"], (1, 1), c["group"]), c["pool"])
        assert_close(y, ref)
        # exactly the max of the unfused op's outputs: the pool adds no rounding of its own
        conv = make_session(plain, lib, isa=isa, conv=algo).run(None, {"X": x})[0]
        np.testing.assert_array_equal(y, pool_ref(conv, c["pool"]).astype(np.float32), err_msg=f"case {i}")


@pytest.mark.parametrize("isa", ISAS)
def test_fused_pool_every_batch_size_and_threads(lib, isa):
    # the automatic choice pools in lanes from 16 images: every size agrees, 1 and 2 threads bitwise
    rng = np.random.default_rng(14)
    wt = random_sparse(rng, (6, 4, 3, 3), 0.3)
    b = rng.standard_normal(6).astype(np.float32)
    model = csr.make_sparse_conv_model(wt, b, input_hw=(7, 6), pads=(1, 0, 1, 1), max_pool=(2, 2))
    one, two = make_session(model, lib, isa=isa), make_session(model, lib, threads=2, isa=isa)
    for n in [*range(1, 71), 256]:
        x = rng.standard_normal((n, 4, 7, 6)).astype(np.float32)
        y = one.run(None, {"X": x})[0]
        assert y.shape == (n, 6, 3, 2)
        assert_close(y, pool_ref(torch_conv(x, wt, b, (1, 1), (1, 0, 1, 1), (1, 1), 1), (2, 2)))
        np.testing.assert_array_equal(two.run(None, {"X": x})[0], y)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("isa", ISAS)
def test_fused_pool_nonfinite_inputs_follow_dense_conv_then_torch_pool(lib, isa, algo):
    rng = np.random.default_rng(63)
    wt = random_sparse(rng, (6, 3, 3, 2), 0.4)
    b = rng.standard_normal(6).astype(np.float32)
    model = csr.make_sparse_conv_model(wt, b, input_hw=(9, 8), pads=(1, 0, 1, 1), max_pool=(2, 2))
    sess = make_session(model, lib, isa=isa, conv=algo)
    for n in (1, 20):
        x = rng.standard_normal((n, 3, 9, 8)).astype(np.float32)
        _poison(x, rng, 3 + n // 4)
        with np.errstate(invalid="ignore"):
            ref = pool_ref(_dense_conv(x, wt, b, (1, 1), (1, 0, 1, 1), 1), (2, 2))
        y = sess.run(None, {"X": x})[0]
        assert np.isnan(ref).any()
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
        np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
        fin = np.isfinite(ref)
        assert_close(np.where(fin, y, 0), np.where(fin, ref, 0))


# ------------------------------------------------------------------------------------------------
# The graph rewrite


def _conv_pool_graph(pool_attrs: dict, extra_reader=False, conv_output_is_graph_output=False,
                     pool_outputs=("P",), relu=False) -> onnx.ModelProto:
    """X -> SparseConv (Y) [-> Relu (R)] -> MaxPool (P) -> Relu (Z); extra_reader: Sigmoid(Y or R) is an output."""
    rng = np.random.default_rng(8)
    conv, tensors = csr.sparse_conv_node("X", "Y", random_sparse(rng, (4, 2, 3, 3), 0.5),
                                         rng.standard_normal(4).astype(np.float32))
    pooled = "R" if relu else "Y"
    nodes = [conv, *([helper.make_node("Relu", ["Y"], ["R"])] if relu else []),
             helper.make_node("MaxPool", [pooled], list(pool_outputs), **pool_attrs),
             helper.make_node("Relu", ["P"], ["Z"])]
    any4 = [None] * 4
    outputs = [helper.make_tensor_value_info("Z", TensorProto.FLOAT, any4)]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", [pooled], ["S"]))
        outputs.append(helper.make_tensor_value_info("S", TensorProto.FLOAT, any4))
    if conv_output_is_graph_output:
        outputs.append(helper.make_tensor_value_info("Y", TensorProto.FLOAT, any4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 2, 10, 9])],
                              outputs, tensors, value_info=[helper.make_tensor_value_info("Y", TensorProto.FLOAT, any4)])
    return helper.make_model(graph, opset_imports=csr.opset_imports())


@pytest.mark.parametrize("attrs", [
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 2], strides=[3, 2], pads=[0, 0, 0, 0], dilations=[1, 1], ceil_mode=0, storage_order=1),
    dict(kernel_shape=[1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID"),
])
@pytest.mark.parametrize("relu", [False, True])
def test_fusable_max_pools_are_fused_with_the_same_outputs(lib, attrs, relu):
    model = _conv_pool_graph(attrs, relu=relu)
    x = np.random.default_rng(9).standard_normal((3, 2, 10, 9)).astype(np.float32)
    want = make_session(model, lib).run(None, {"X": x})[0]
    assert fuse_max_pools(model) == 1
    assert [n.op_type for n in model.graph.node] == ["SparseConv", *(["Relu"] if relu else []), "Relu"]
    conv = model.graph.node[0]
    assert list(conv.output) == ["Y" if relu else "P"]
    if relu:  # the Relu moved behind the pool
        assert list(model.graph.node[1].input) == ["Y"] and list(model.graph.node[1].output) == ["P"]
        assert "R" not in {v.name for v in model.graph.value_info}
    assert [list(a.ints) for a in conv.attribute if a.name == "max_pool"] == [attrs["kernel_shape"]]
    assert "Y" not in {v.name for v in model.graph.value_info}
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(make_session(model, lib).run(None, {"X": x})[0], want)
    assert fuse_max_pools(model) == 0  # idempotent


@pytest.mark.parametrize("attrs, kw", [
    (dict(kernel_shape=[3, 3], strides=[2, 2]), {}),  # overlapping windows (AlexNet's pools)
    (dict(kernel_shape=[2, 2]), {}),  # strides default to 1
    (dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]), {}),
    (dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), {}),
    (dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2]), {}),
    (dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"), {}),
    (dict(kernel_shape=[2, 2], strides=[2, 2]), dict(pool_outputs=("P", "I"))),  # Indices are read
    (dict(kernel_shape=[2, 2], strides=[2, 2]), dict(extra_reader=True)),
    (dict(kernel_shape=[2, 2], strides=[2, 2]), dict(conv_output_is_graph_output=True)),
    (dict(kernel_shape=[2, 2], strides=[2, 2]), dict(relu=True, extra_reader=True)),  # the Relu's output is read
])
def test_other_max_pools_are_left_alone(attrs, kw):
    model = _conv_pool_graph(attrs, **kw)
    before = model.SerializeToString()
    assert fuse_max_pools(model) == 0
    assert model.SerializeToString() == before


def _lenet_like() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 5), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3), nn.ReLU(), nn.MaxPool2d(2, 2),
                        nn.Flatten(), nn.Linear(12 * 2 * 2, 10))
    for i in (0, 2):
        layer = masked_from_dense(net[i])
        layer.prune_(torch.rand_like(layer.weight) < 0.4)
        net[i] = layer
    return net


def test_fast_form_fuses_pools_and_reads_back_as_standard_layers(lib, tmp_path):
    net, example = _lenet_like(), torch.zeros(1, 1, 16, 16)
    x = np.random.default_rng(4).standard_normal((20, 1, 16, 16)).astype(np.float32)
    portable, fast, name, want, got = export_and_run_both_forms(net, tmp_path, example, x)
    nodes = onnx.load(fast).graph.node
    assert not [n for n in nodes if n.op_type in ("MaxPool", "Relu")]
    assert [len([a for a in n.attribute if a.name == "max_pool"]) for n in nodes if n.op_type == "SparseConv"] == [1, 1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # same layers, MACs and non-zeros as the portable form
    (fs, ft), (ps, pt) = measure(fast), measure(portable)
    assert (ft["macs"], ft["macs_dense"], ft["nnz"]) == (pt["macs"], pt["macs_dense"], pt["nnz"])
    assert [s.macs for s in fs] == [s.macs for s in ps]
    # read back: pruned convs followed by standard max pools, re-exportable
    back = toolchain.load(fast)
    assert sum(isinstance(m, nn.MaxPool2d) for m in back.modules()) == 2
    assert sum(isinstance(m, nn.ReLU) for m in back.modules()) == 1
    np.testing.assert_allclose(back(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    again = tmp_path / "again.onnx"
    toolchain.export(back, again, form="fast", example_input=example)
    got2 = ort.InferenceSession(str(again), kernels.session_options(1), providers=["CPUExecutionProvider"]).run(
        None, {name: x})[0]
    np.testing.assert_array_equal(got2, got)


def test_bad_max_pool_attribute_is_an_import_error(tmp_path):
    model = _conv_pool_graph(dict(kernel_shape=[2, 2], strides=[2, 2]))
    fuse_max_pools(model)
    attrs = model.graph.node[0].attribute
    next(a for a in attrs if a.name == "max_pool").ints[:] = [2, 0]
    with pytest.raises(toolchain.errors.ModelFormatError, match="max_pool must be 2 positive ints"):
        toolchain.load(model)


# ------------------------------------------------------------------------------------------------
# Fused ReLU


def _stock_relu(y: np.ndarray) -> np.ndarray:
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "relu",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": y})[0]


def _assert_bitwise(y: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(want))  # -0 stays -0, as in onnxruntime's Relu


def _linear_model(form: str, w, b, activation=None) -> onnx.ModelProto:
    if form == "fp32":
        return csr.make_sparse_linear_model(w, b, activation=activation)
    p = packed.encode_int8(w) if form == "int8" else packed.encode_codebook(
        w, np.linspace(-2, 2, 16, dtype=np.float32), 4)
    model = packed.make_packed_linear_model(p, b)
    if activation:
        model.graph.node[0].attribute.append(helper.make_attribute("activation", activation))
    return model


@pytest.mark.parametrize("form", ["fp32", "codebook4", "int8"])
@pytest.mark.parametrize("isa", ISAS)
def test_fused_relu_linear_is_stock_relu_of_the_op(lib, isa, form):
    rng = np.random.default_rng(31)
    w = random_sparse(rng, (37, 300), 0.3, empty_rows=3)
    b = rng.standard_normal(37).astype(np.float32)
    b[:3] = -0.0  # empty rows give -0 + nothing: the sign must survive
    fused = make_session(_linear_model(form, w, b, "Relu"), lib, isa=isa)
    fused2 = make_session(_linear_model(form, w, b, "Relu"), lib, threads=2, isa=isa)
    plain = make_session(_linear_model(form, w, b), lib, isa=isa)
    for n in [*range(1, 71), 256]:
        x = rng.standard_normal((n, 300)).astype(np.float32)
        if n % 7 == 0:
            _poison(x, rng, 2)
        want = _stock_relu(plain.run(None, {"X": x})[0])
        y = fused.run(None, {"X": x})[0]
        _assert_bitwise(y, want)
        _assert_bitwise(fused2.run(None, {"X": x})[0], y)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("isa", ISAS)
def test_fused_relu_conv_is_stock_relu_of_the_op(lib, isa, algo):
    for i, c in enumerate(CASES):
        rng = np.random.default_rng(300 + i)
        wt = random_sparse(rng, (c["m"], c["c"] // c["group"], *c["k"]), c["density"])
        b = rng.standard_normal(c["m"]).astype(np.float32)
        kw = dict(input_hw=c["hw"], strides=c["strides"], pads=c["pads"], group=c["group"])
        x = rng.standard_normal((c["n"], c["c"], *c["hw"])).astype(np.float32)
        if i % 2:
            _poison(x, rng, 2)
        for pool in (None, c["pool"]):
            plain = make_session(csr.make_sparse_conv_model(wt, b, max_pool=pool, **kw), lib, isa=isa, conv=algo)
            fused = make_session(csr.make_sparse_conv_model(wt, b, max_pool=pool, activation="Relu", **kw), lib,
                                 threads=1 + i % 2, isa=isa, conv=algo)
            _assert_bitwise(fused.run(None, {"X": x})[0], _stock_relu(plain.run(None, {"X": x})[0]))


def _linear_relu_graph(extra_reader=False, relu_output_is_graph_output=False, linear_output_is_graph_output=False):
    """X -> SparseLinear (Y) -> Relu (R) -> SparseLinear (Z)."""
    rng = np.random.default_rng(10)
    fc1, t1 = csr.sparse_linear_node("X", "Y", random_sparse(rng, (8, 6), 0.5), None, name="fc1")
    fc2, t2 = csr.sparse_linear_node("R", "Z", random_sparse(rng, (3, 8), 0.5), None, name="fc2")
    nodes = [fc1, helper.make_node("Relu", ["Y"], ["R"]), fc2]
    outputs = [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None, 3])]
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["Y"], ["S"]))
        outputs.append(helper.make_tensor_value_info("S", TensorProto.FLOAT, [None, 8]))
    for flag, name in ((relu_output_is_graph_output, "R"), (linear_output_is_graph_output, "Y")):
        if flag:
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 6])],
                              outputs, t1 + t2, value_info=[helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 8])])
    return helper.make_model(graph, opset_imports=csr.opset_imports())


def test_relu_after_a_layer_op_is_fused(lib):
    model = _linear_relu_graph()
    x = np.random.default_rng(11).standard_normal((5, 6)).astype(np.float32)
    want = make_session(model, lib).run(None, {"X": x})[0]
    assert fuse_relus(model) == 1
    assert [n.op_type for n in model.graph.node] == ["SparseLinear", "SparseLinear"]
    fc1 = model.graph.node[0]
    assert list(fc1.output) == ["R"] and [a.s for a in fc1.attribute if a.name == "activation"] == [b"Relu"]
    assert "Y" not in {v.name for v in model.graph.value_info}
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(make_session(model, lib).run(None, {"X": x})[0], want)
    assert fuse_relus(model) == 0


@pytest.mark.parametrize("kw", [dict(extra_reader=True), dict(linear_output_is_graph_output=True)])
def test_relu_with_other_readers_is_left_alone(kw):
    model = _linear_relu_graph(**kw)
    before = model.SerializeToString()
    assert fuse_relus(model) == 0
    assert model.SerializeToString() == before


def test_relu_whose_output_is_a_graph_output_is_fused_keeping_the_name(lib):
    model = _linear_relu_graph(relu_output_is_graph_output=True)
    assert fuse_relus(model) == 1
    assert list(model.graph.node[0].output) == ["R"]


def test_conv_relu_pool_becomes_one_node(lib):
    model = _conv_pool_graph(dict(kernel_shape=[2, 2], strides=[2, 2]), relu=True)
    x = np.random.default_rng(12).standard_normal((20, 2, 10, 9)).astype(np.float32)
    want = make_session(model, lib).run(None, {"X": x})[0]
    assert to_fast_ops(model) == 2  # the pool and the Relu before it (the graph's second Relu stays)
    assert [n.op_type for n in model.graph.node] == ["SparseConv", "Relu"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["max_pool"] == [2, 2] and attrs["activation"] == b"Relu"
    np.testing.assert_array_equal(make_session(model, lib).run(None, {"X": x})[0], want)


def test_bad_activation_is_an_import_error():
    model = _linear_relu_graph()
    fuse_relus(model)
    next(a for a in model.graph.node[0].attribute if a.name == "activation").s = b"Tanh"
    with pytest.raises(toolchain.errors.ModelFormatError, match="activation must be 'Relu' or absent"):
        toolchain.load(model)
