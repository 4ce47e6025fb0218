"""Caffe import: prototxt (+ caffemodel) -> ONNX, checked against PyTorch and numpy references."""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from converters.caffe import convert_caffe, export_caffe, import_caffe, read_caffemodel, schema, write_caffe
from converters.caffe.writer import CaffeExport
from toolchain.cli import main
from toolchain.errors import ModelFormatError
from toolchain.zoo import create_model, get_model_spec


def run_onnx(model, x: np.ndarray, name: str = "data") -> list[np.ndarray]:
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    sess = ort.InferenceSession(str(data) if not isinstance(data, bytes) else data, providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}


def torch_ref(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


# --- the reference models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["layer", "fields", "v1"])
@pytest.mark.parametrize("name", ["lenet-300-100", "lenet-5"])
def test_lenets_match_pytorch(tmp_path, name, style):
    torch.manual_seed(1)
    model = create_model(name).eval()
    shape = get_model_spec(name).input_shape
    proto, weights, out = tmp_path / "net.prototxt", tmp_path / "net.caffemodel", tmp_path / "net.onnx"
    write_caffe(model, shape, proto, weights, legacy=style == "v1",
                input_style="fields" if style == "fields" else "layer")
    text = proto.read_text()
    assert ("layers {" in text and "type: INNER_PRODUCT" in text) if style == "v1" else 'type: "InnerProduct"' in text
    assert ('type: "Input"' in text) == (style == "layer")

    result = import_caffe(proto, weights, out)
    model_onnx = onnx.load(out)
    onnx.checker.check_model(model_onnx, full_check=True)
    assert model_onnx.opset_import[0].version == 17
    inits = initializers(model_onnx)
    for lname in ("ip1", "ip2") + (("conv1", "conv2") if name == "lenet-5" else ("ip3",)):
        assert f"{lname}.weight" in inits and f"{lname}.bias" in inits
        assert lname in {n.name for n in model_onnx.graph.node}
    np.testing.assert_array_equal(inits["ip1.weight"], model.ip1.weight.detach().numpy())
    assert result.num_params == sum(p.numel() for p in model.parameters())
    assert result.inputs == {"data": ("N",) + shape} and result.legacy == (style == "v1")
    assert model_onnx.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"

    x = np.random.default_rng(0).random((3,) + shape, dtype=np.float32)
    (y,) = run_onnx(model_onnx, x)
    np.testing.assert_allclose(y, torch_ref(model, x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def alexnet_files(tmp_path_factory):
    """AlexNet (244 MB of weights) written once, as the legacy V1 files bvlc_alexnet shipped."""
    d = tmp_path_factory.mktemp("alexnet")
    torch.manual_seed(0)
    model = create_model("alexnet").eval()
    export = write_caffe(model, (3, 227, 227), d / "deploy.prototxt", d / "bvlc_alexnet.caffemodel", legacy=True,
                         name="AlexNet")
    return model, export, d


def test_alexnet_matches_pytorch(alexnet_files, capsys):
    model, export, d = alexnet_files
    # The zoo model's data_norm (x*255 - mean) is not a Caffe layer: the writer reports it ...
    assert export.input_scale == 255.0 and export.mean == (104.0, 117.0, 123.0)
    assert "data_norm" not in export.layer_names and "norm1" in export.layer_names
    out = d / "alexnet.onnx"
    # ... and the import bakes it back in.
    rc = main(["import", "caffe", str(d / "deploy.prototxt"), str(d / "bvlc_alexnet.caffemodel"), "-o", str(out),
               "--input-scale", "255", "--mean", "104,117,123"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "60,965,224 parameters" in printed and str(out) in printed and "legacy V1" in printed

    m = onnx.load(out)
    nodes = {n.name: n for n in m.graph.node}
    conv2 = nodes["conv2"]
    assert conv2.op_type == "Conv" and onnx.helper.get_attribute_value(
        next(a for a in conv2.attribute if a.name == "group")) == 2
    assert nodes["norm1"].op_type == "LRN" and nodes["fc6"].op_type == "Gemm"
    assert "drop6" not in nodes  # Dropout is the identity at inference
    assert {o.name for o in m.graph.output} == {"fc8"}

    x = np.random.default_rng(0).random((2, 3, 227, 227), dtype=np.float32)
    (y,) = run_onnx(str(out), x)
    ref = torch_ref(model, x)
    assert y.shape == (2, 1000)
    # Outputs are O(1); compare relative to their scale.
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


# --- other ways of writing a net ------------------------------------------------------------------------------

def test_prototxt_only_gives_seeded_caffe_like_random_weights(tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text("""
name: "rand"
input: "data"
input_shape { dim: 1 dim: 1 dim: 28 dim: 28 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0.2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1" inner_product_param { num_output: 10 } }
""")
    a = convert_caffe(proto, seed=3)
    b = convert_caffe(proto, seed=3)
    c = convert_caffe(proto, seed=4)
    wa, wb, wc = initializers(a.model), initializers(b.model), initializers(c.model)
    assert a.random_init and a.num_params == 20 * 25 + 20 + 10 * 20 * 24 * 24 + 10
    np.testing.assert_array_equal(wa["conv1.weight"], wb["conv1.weight"])
    assert not np.array_equal(wa["conv1.weight"], wc["conv1.weight"])
    assert wa["conv1.weight"].shape == (20, 1, 5, 5)
    assert 0.008 < wa["conv1.weight"].std() < 0.012  # gaussian std 0.01
    np.testing.assert_array_equal(wa["conv1.bias"], np.full(20, 0.2, np.float32))
    # No filler given: xavier, uniform in +-sqrt(3 / fan_in); the bias is Caffe's constant 0.
    limit = math.sqrt(3 / (20 * 24 * 24))
    w = wa["ip1.weight"]
    assert w.shape == (10, 20 * 24 * 24) and np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit
    assert not wa["ip1.bias"].any()
    (y,) = run_onnx(a.model, np.zeros((2, 1, 28, 28), np.float32))
    assert y.shape == (2, 10)


LENET_TRAIN_TEST = """
name: "LeNet"
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "mnist_train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "mnist" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "mnist_test_lmdb" batch_size: 100 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1 weight_filler { type: "xavier" }
  bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 stride: 1 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" inner_product_param { num_output: 500 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 10 } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_train_net_with_data_layer(tmp_path):
    torch.manual_seed(2)
    model = create_model("lenet-5").eval()
    weights = tmp_path / "lenet.caffemodel"
    write_caffe(model, (1, 28, 28), tmp_path / "deploy.prototxt", weights)  # deploy weights fit the train net
    proto = tmp_path / "lenet_train_test.prototxt"
    proto.write_text(LENET_TRAIN_TEST)

    with pytest.raises(ModelFormatError, match=r"data layer 'mnist'.*--input-shape"):
        convert_caffe(proto, weights)
    result = convert_caffe(proto, weights, input_shape=(1, 28, 28))
    assert result.inputs == {"data": ("N", 1, 28, 28)} and result.outputs == {"ip2": ("N", 10)}
    assert ("loss", "SoftmaxWithLoss") in result.skipped and ("accuracy", "Accuracy") in result.skipped
    # The Data layer read 0..255 bytes and scaled them by 1/256: our [0,1] input becomes x*255/256.
    assert result.preprocess.describe() == "(x*255)*0.00390625"
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    (y,) = run_onnx(result.model, x)
    np.testing.assert_allclose(y, torch_ref(model, x * np.float32(255 / 256)), atol=1e-5, rtol=0)
    # --input-scale replaces the 255: 256 makes the graph see exactly x.
    (y,) = run_onnx(convert_caffe(proto, weights, input_shape=(1, 28, 28), input_scale=256).model, x)
    np.testing.assert_allclose(y, torch_ref(model, x), atol=1e-5, rtol=0)

    # A layer that needs the label at inference cannot be converted.
    proto.write_text(LENET_TRAIN_TEST +
                     'layer { name: "cat" type: "Concat" bottom: "ip2" bottom: "label" top: "cat" }\n')
    with pytest.raises(ModelFormatError, match=r"layer 'cat' \(Concat\): bottom blob 'label' comes from data layer"):
        convert_caffe(proto, weights, input_shape=(1, 28, 28))


LEGACY_V1_TRAIN = """
name: "CaffeNet-ish"
layers { name: "data" type: DATA top: "data" top: "label"
  data_param { source: "train_lmdb" backend: LMDB batch_size: 256 }
  transform_param { crop_size: 8 mean_value: 104 mean_value: 117 mean_value: 123 mirror: true }
  include: { phase: TRAIN } }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "pool1" type: POOLING bottom: "conv1" top: "pool1" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }
layers { name: "fc" type: INNER_PRODUCT bottom: "pool1" top: "fc" inner_product_param { num_output: 5 } }
layers { name: "drop" type: DROPOUT bottom: "fc" top: "fc" dropout_param { dropout_ratio: 0.5 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" }
"""


def test_legacy_v1_train_net_with_mean(tmp_path):
    proto = tmp_path / "train_val.prototxt"
    proto.write_text(LEGACY_V1_TRAIN)
    # Without include rules for TEST, the TRAIN-only data layer is filtered out: no input at all.
    with pytest.raises(ModelFormatError, match="no input: every data layer is excluded.*phase: TRAIN"):
        convert_caffe(proto)
    proto.write_text(LEGACY_V1_TRAIN.replace("include: { phase: TRAIN }", ""))
    result = convert_caffe(proto, input_shape=(3, 8, 8), seed=1)
    assert result.legacy and result.outputs == {"fc": ("N", 5)}
    assert result.preprocess.describe() == "x*255 - [104, 117, 123]"
    inits = initializers(result.model)
    rng = np.random.default_rng(5)
    x = rng.random((2, 3, 8, 8), dtype=np.float32)
    (y,) = run_onnx(result.model, x)
    # Reference: Caffe's arithmetic written out with torch.
    t = torch.from_numpy(x) * 255 - torch.tensor([104.0, 117.0, 123.0]).view(1, 3, 1, 1)
    t = F.relu(F.conv2d(t, torch.from_numpy(inits["conv1.weight"]), torch.from_numpy(inits["conv1.bias"]),
                        stride=2, padding=1))
    t = torch.from_numpy(caffe_pool(t.numpy(), (3, 3), (2, 2), (0, 0), "AVE"))
    ref = t.flatten(1) @ torch.from_numpy(inits["fc.weight"]).T + torch.from_numpy(inits["fc.bias"])
    np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-4)
    # The in-place Dropout at the end leaves the output under its blob name.
    assert [o.name for o in result.model.graph.output] == ["fc"]


# --- pooling: Caffe's ceil-mode arithmetic ------------------------------------------------------------------

def caffe_pool(x: np.ndarray, kernel, stride, pad, method: str, ceil: bool = True) -> np.ndarray:
    """Caffe's PoolingLayer (Reshape + Forward_cpu), written out loop by loop."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad

    def pooled(size, k, p, s):
        span = size + 2 * p - k
        out = (math.ceil(span / s) if ceil else span // s) + 1
        if (ph or pw) and (out - 1) * s >= size + p:
            out -= 1
        return out

    oh, ow = pooled(h, kh, ph, sh), pooled(w, kw, pw, sw)
    y = np.zeros((n, c, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            hs, ws = i * sh - ph, j * sw - pw
            if method == "MAX":
                he, we = min(hs + kh, h), min(ws + kw, w)
                hs, ws = max(hs, 0), max(ws, 0)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].max(axis=(2, 3))
            else:
                he, we = min(hs + kh, h + ph), min(ws + kw, w + pw)
                pool_size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                y[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / pool_size
    return y.astype(np.float32)


POOL_CASES = [
    # (input H, W, pooling_param text, kernel, stride, pad, ceil)
    (6, 6, "kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), True),  # ceil gives 3x3, floor 2x2
    (6, 6, "kernel_size: 3 stride: 2 pad: 1", (3, 3), (2, 2), (1, 1), True),  # 4x4 vs floor 3x3
    (5, 5, "kernel_size: 3 stride: 3 pad: 1", (3, 3), (3, 3), (1, 1), True),  # last window clipped: 2x2
    (7, 6, "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0", (3, 2), (2, 3), (1, 0), True),
    (6, 6, "kernel_size: 3 stride: 2 round_mode: FLOOR", (3, 3), (2, 2), (0, 0), False),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("h,w,text,kernel,stride,pad,ceil", POOL_CASES)
def test_pooling_matches_caffe_formula(tmp_path, method, h, w, text, kernel, stride, pad, ceil):
    proto = tmp_path / "pool.prototxt"
    proto.write_text(f'input: "data" input_shape {{ dim: 1 dim: 2 dim: {h} dim: {w} }}\n'
                     f'layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool" '
                     f'pooling_param {{ pool: {method} {text} }} }}\n')
    x = np.random.default_rng(0).standard_normal((2, 2, h, w)).astype(np.float32)
    ref = caffe_pool(x, kernel, stride, pad, method, ceil)
    result = convert_caffe(proto)
    (y,) = run_onnx(result.model, x)
    assert y.shape == ref.shape and result.outputs["pool"] == ("N", 2) + ref.shape[2:]
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_ceil_mode_differs_from_floor_in_the_cases_above():
    x = np.zeros((1, 1, 6, 6), np.float32)
    assert caffe_pool(x, (3, 3), (2, 2), (0, 0), "MAX").shape[2:] == (3, 3)
    assert caffe_pool(x, (3, 3), (2, 2), (0, 0), "MAX", ceil=False).shape[2:] == (2, 2)
    assert caffe_pool(x, (3, 3), (2, 2), (1, 1), "AVE").shape[2:] == (4, 4)
    assert caffe_pool(x, (3, 3), (2, 2), (1, 1), "AVE", ceil=False).shape[2:] == (3, 3)


def test_global_pooling(tmp_path):
    proto = tmp_path / "gp.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 3 dim: 5 dim: 7 }\n'
                     'layer { name: "gap" type: "Pooling" bottom: "data" top: "gap"\n'
                     '  pooling_param { pool: AVE global_pooling: true } }\n'
                     'layer { name: "gmp" type: "Pooling" bottom: "data" top: "gmp"\n'
                     '  pooling_param { pool: MAX global_pooling: true } }\n')
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 7)).astype(np.float32)
    ya, ym = run_onnx(convert_caffe(proto).model, x)
    np.testing.assert_allclose(ya, x.mean(axis=(2, 3), keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ym, x.max(axis=(2, 3), keepdims=True))


# --- other layers ----------------------------------------------------------------------------------------------

def test_batchnorm_scale_with_scale_factor(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("bn1", nn.BatchNorm2d(4))
    model.add_module("relu1", nn.ReLU())
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
    export = export_caffe(model.eval(), (3, 5, 5), input_style="fields")
    assert [lp.type for lp in export.net.layer] == ["Convolution", "BatchNorm", "Scale", "ReLU", "InnerProduct"]
    # Caffe stores running sums and their scale factor: statistics = blobs[0:2] / blobs[2].
    mean, var, _ = export.blobs["bn1"]
    export.blobs["bn1"] = [mean * 7.5, var * 7.5, np.array([7.5], np.float32)]
    proto, weights = tmp_path / "bn.prototxt", tmp_path / "bn.caffemodel"
    export.write(proto, weights)
    text = proto.read_text()
    assert 'bottom: "conv1"\n  top: "conv1"' in text  # BatchNorm and Scale work in place
    result = convert_caffe(proto, weights)
    ops = {n.name: n.op_type for n in result.model.graph.node}
    assert ops["bn1"] == "BatchNormalization" and ops["bn1_scale"] == "Add"
    inits = initializers(result.model)
    np.testing.assert_allclose(inits["bn1.running_mean"], model.bn1.running_mean.numpy(), rtol=1e-6)
    assert inits["bn1_scale.weight"].shape == (4, 1, 1)
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    (y,) = run_onnx(result.model, x)
    np.testing.assert_allclose(y, torch_ref(model, x), atol=1e-5, rtol=0)


BRANCHES = """
name: "branches"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 6 dim: 6 } } }
layer { name: "split" type: "Split" bottom: "data" top: "d1" top: "d2" }
layer { name: "conv_a" type: "Convolution" bottom: "d1" top: "a" convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "conv_b" type: "Convolution" bottom: "d2" top: "b"
  convolution_param { num_output: 4 kernel_h: 1 kernel_w: 3 pad_h: 0 pad_w: 1 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "prod" type: "Eltwise" bottom: "a" bottom: "b" bottom: "a" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "a" bottom: "b" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "prod" bottom: "max" top: "cat" }
layer { name: "leaky" type: "ReLU" bottom: "cat" top: "cat" relu_param { negative_slope: 0.1 } }
layer { name: "flat" type: "Flatten" bottom: "cat" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 5 transpose: true } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
layer { name: "drop" type: "Dropout" bottom: "prob" top: "prob" }
layer { name: "side" type: "Eltwise" bottom: "a" bottom: "a" bottom: "b" top: "side" }
"""


def test_eltwise_concat_leaky_relu_flatten_softmax(tmp_path):
    proto = tmp_path / "branches.prototxt"
    proto.write_text(BRANCHES)
    result = convert_caffe(proto, seed=7)
    assert result.outputs == {"prob": ("N", 5), "side": ("N", 4, 6, 6)}
    inits = initializers(result.model)
    assert inits["ip.weight"].shape == (5, 12 * 36)  # transposed Caffe blob, stored [out, in]
    ops = {n.name: n.op_type for n in result.model.graph.node}
    assert ops["leaky"] == "LeakyRelu" and ops["cat"] == "Concat" and ops["side"] == "Sum" and ops["max"] == "Max"

    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    prob, side = run_onnx(result.model, x)
    t = torch.from_numpy(x)
    a = F.conv2d(t, torch.from_numpy(inits["conv_a.weight"]), torch.from_numpy(inits["conv_a.bias"]), padding=1)
    b = F.conv2d(t, torch.from_numpy(inits["conv_b.weight"]), padding=(0, 1))
    cat = torch.cat([a - 0.5 * b, a * b * a, torch.maximum(a, b)], dim=1)
    w, bias = torch.from_numpy(inits["ip.weight"]), torch.from_numpy(inits["ip.bias"])
    logits = F.leaky_relu(cat, 0.1).flatten(1) @ w.T + bias
    np.testing.assert_allclose(prob, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(side, (2 * a + b).numpy(), rtol=1e-5, atol=1e-5)


def test_lrn_within_channel_and_scale_with_two_bottoms(tmp_path):
    proto = tmp_path / "lrn.prototxt"
    proto.write_text("""
input: "data" input_shape { dim: 1 dim: 2 dim: 5 dim: 5 }
input: "gain" input_shape { dim: 1 dim: 2 }
layer { name: "norm" type: "LRN" bottom: "data" top: "norm"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "gate" type: "Scale" bottom: "norm" bottom: "gain" top: "gate" scale_param { axis: 0 } }
""")
    result = convert_caffe(proto)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal((2, 2)).astype(np.float32)
    sess = ort.InferenceSession(result.model.SerializeToString())
    (y,) = sess.run(None, {"data": x, "gain": g})
    # Caffe: x * (1 + alpha * mean_{3x3, zero padded}(x^2))^-beta, the mean always over 9 values.
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    avg = sum(sq[:, :, i:i + 5, j:j + 5] for i in range(3) for j in range(3)) / 9
    ref = x * (1 + 0.5 * avg) ** -0.75 * g[:, :, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


# --- the writer -------------------------------------------------------------------------------------------------

def test_writer_files_parse_with_the_full_schema(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet-5")
    for legacy in (False, True):
        export = write_caffe(model, (1, 28, 28), tmp_path / "l.prototxt", tmp_path / "l.caffemodel", legacy=legacy)
        net = schema.NetParameter()
        net.ParseFromString((tmp_path / "l.caffemodel").read_bytes())
        layers = net.layers if legacy else net.layer
        conv1 = next(lp for lp in layers if lp.name == "conv1")
        w = conv1.blobs[0]
        if legacy:
            assert (w.num, w.channels, w.height, w.width) == (20, 1, 5, 5)
            assert (conv1.blobs[1].num, conv1.blobs[1].width) == (1, 20)  # bias as 1x1x1x20
        else:
            assert list(w.shape.dim) == [20, 1, 5, 5]
        np.testing.assert_array_equal(np.array(w.data, np.float32), model.conv1.weight.detach().numpy().ravel())
        blobs = read_caffemodel(tmp_path / "l.caffemodel")
        assert set(blobs) == {"conv1", "conv2", "ip1", "ip2"} and blobs["ip1"][0].legacy == legacy
        assert isinstance(export, CaffeExport)


def test_writer_rejects_modules_without_caffe_equivalent():
    with pytest.raises(ModelFormatError, match=r"module 'act' \(GELU\)"):
        export_caffe(_seq(("fc", nn.Linear(4, 4)), ("act", nn.GELU())), (4,))
    with pytest.raises(ModelFormatError, match="V1"):
        export_caffe(_seq(("bn", nn.BatchNorm2d(1))), (1, 4, 4), legacy=True)


def _seq(*named):
    m = nn.Sequential()
    for n, mod in named:
        m.add_module(n, mod)
    return m


# --- bad input: one-line errors, no output file ----------------------------------------------------------------

@pytest.fixture
def lenet_files(tmp_path):
    torch.manual_seed(0)
    write_caffe(create_model("lenet-5"), (1, 28, 28), tmp_path / "lenet.prototxt", tmp_path / "lenet.caffemodel")
    return tmp_path / "lenet.prototxt", tmp_path / "lenet.caffemodel"


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BAD_INPUTS = {
    "blob shape": (lambda p, w: _edit(p, "num_output: 20", "num_output: 21"),
                   r"layer 'conv1' \(Convolution\): weight blob in .* has shape \[20, 1, 5, 5\], "
                   r"the prototxt implies \[21, 1, 5, 5\]"),
    "truncated": (lambda p, w: w.write_bytes(w.read_bytes()[:100_000]), r"lenet\.caffemodel: .*truncated"),
    "syntax": (lambda p, w: _edit(p, 'type: "Pooling"', 'type: "Pooling" }}'),
               r"lenet\.prototxt: line \d+: prototxt syntax error"),
    "missing bottom": (lambda p, w: _edit(p, 'bottom: "pool1"', 'bottom: "pool_1"'),
                       r"layer 'conv2' \(Convolution\): bottom blob 'pool_1' is not produced by any earlier layer"),
    "unsupported": (lambda p, w: _edit(p, 'type: "ReLU"', 'type: "Swish"'),
                    r"layer 'relu1' has unsupported type 'Swish'"),
    "layer without weights": (lambda p, w: _edit(p, 'name: "ip2"', 'name: "fc2"'),
                              r"layer 'fc2' \(InnerProduct\): .*lenet\.caffemodel has no weights for this layer"),
    "blob count": (lambda p, w: _edit(p, "num_output: 20", "num_output: 20\n    bias_term: false"),
                   r"layer 'conv1' .* has 2 blobs for this layer, the prototxt implies 1 \(weight\)"),
    "top reused": (lambda p, w: _edit(p, 'top: "pool2"', 'top: "pool1"'),
                   r"layer 'pool2' \(Pooling\): top blob 'pool1' is already produced"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_without_output(lenet_files, tmp_path, capsys, case):
    proto, weights = lenet_files
    corrupt, pattern = BAD_INPUTS[case]
    corrupt(proto, weights)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ModelFormatError, match=pattern) as info:
        import_caffe(proto, weights, out)
    assert "\n" not in str(info.value)
    assert not out.exists()

    rc = main(["import", "caffe", str(proto), str(weights), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and err.startswith("toolchain import: error: ")
    assert not list(tmp_path.rglob("*.onnx*"))  # no temporary file left either


def test_syntax_error_names_the_line(tmp_path):
    proto = tmp_path / "bad.prototxt"
    proto.write_text('name: "x"\ninput: "data"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom: data\n}\n')
    with pytest.raises(ModelFormatError, match=r"bad\.prototxt: line 6: prototxt syntax error"):
        convert_caffe(proto)


def test_unknown_fields_are_skipped_with_a_warning(tmp_path, caplog):
    proto = tmp_path / "fork.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 4 }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
                     '  inner_product_param { num_output: 2 fork_only_option: 3 } }\n')
    with caplog.at_level(logging.WARNING):
        result = convert_caffe(proto)
    assert "line 3" in caplog.text and "fork_only_option" in caplog.text
    assert result.outputs == {"ip": ("N", 2)}


def test_existing_output_survives_a_failed_import(lenet_files, tmp_path):
    proto, weights = lenet_files
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    _edit(proto, 'type: "ReLU"', 'type: "Bogus"')
    assert main(["import", "caffe", str(proto), str(weights), "-o", str(out)]) == 2
    assert out.read_bytes() == b"previous"


def test_cli_option_errors(lenet_files, tmp_path, capsys):
    proto, weights = lenet_files
    out = tmp_path / "m.onnx"
    assert main(["import", "caffe", str(proto), str(weights), "-o", str(out), "--mean", "1,2"]) == 2
    assert "2 values but input 'data' has 1 channels" in capsys.readouterr().err
    assert main(["import", "caffe", str(proto), str(weights), "-o", str(out), "--input-shape", "1,x,28"]) == 2
    assert "--input-shape must be comma-separated numbers" in capsys.readouterr().err
    assert main(["import", "caffe", str(weights), "-o", str(out)]) == 2
    assert "is it a .caffemodel?" in capsys.readouterr().err
    assert not out.exists()
