"""The library's LRN op (domain ai.toolchain) and the fast form's swap of ONNX LRN nodes to it
(toolchain/kernels/graph.py): same results as stock onnxruntime's LRN and as a float64 numpy
reference, on every ISA path of this CPU, for any thread count; non-finite inputs as stock; bad
attributes fail when the session is created (the subprocess cases are in test_kernels.py)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import helper

import toolchain
from converters.ops.layers import LocalResponseNorm
from test_kernels import ISAS, export_and_run_both_forms, lrn_model, make_session
from toolchain import kernels
from toolchain.kernels.graph import to_fast_ops


@pytest.fixture(scope="module")
def lib():
    return kernels.library_path(build=True)


def reference(x: np.ndarray, size: int, alpha=1e-4, beta=0.75, bias=1.0) -> np.ndarray:
    """ONNX LRN in float64: window [c - floor((size-1)/2), c + ceil((size-1)/2)] clipped to the channels."""
    x64 = x.astype(np.float64)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = np.zeros_like(x64)
    for c in range(x.shape[1]):
        sq[:, c] = (x64[:, max(0, c - lo):c + hi + 1] ** 2).sum(axis=1)
    return x64 / (bias + alpha / size * sq) ** beta


def stock(x: np.ndarray, **attrs) -> np.ndarray:
    sess = ort.InferenceSession(lrn_model("", **attrs).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


CASES = [  # (shape, attributes): positions not a multiple of any vector width, more than one 1024-position task
    ((1, 96, 13, 13), dict(size=5, alpha=1e-4, beta=0.75, bias=1.0)),  # AlexNet's (Caffe) LRN on a small map
    ((3, 7, 5, 7), dict(size=3, alpha=0.5, beta=0.5, bias=2.0)),
    ((2, 5, 40, 30), dict(size=5, alpha=2.0, beta=1.0, bias=1.0)),
    ((1, 4, 3, 3), dict(size=1, alpha=1.0, beta=0.6, bias=0.5)),  # general beta: powf
    ((2, 3, 1, 17), dict(size=7, alpha=3.0, beta=0.75, bias=1.0)),  # window wider than the channels
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,attrs", CASES)
def test_lrn_matches_stock_onnxruntime_and_numpy(lib, isa, shape, attrs):
    x = (np.random.default_rng(0).standard_normal(shape) * 3).astype(np.float32)
    y = make_session(lrn_model(**attrs), lib, isa=isa).run(None, {"X": x})[0]
    ref = reference(x, **attrs)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(y, stock(x, **attrs), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("isa", ISAS)
def test_lrn_any_rank_and_even_size_follow_the_onnx_formula(lib, isa):
    # stock onnxruntime takes only 4-D inputs and odd sizes; ONNX defines the rest, and so does the op
    rng = np.random.default_rng(1)
    for shape, size in (((2, 6, 11), 4), ((1, 5, 2, 3, 4), 2), ((1, 8, 9, 9), 6)):
        x = rng.standard_normal(shape).astype(np.float32)
        y = make_session(lrn_model(size=size, alpha=0.3), lib, isa=isa).run(None, {"X": x})[0]
        np.testing.assert_allclose(y, reference(x, size, alpha=0.3), rtol=2e-6, atol=1e-7)
        # the importer's layer (ONNX window for even sizes) agrees
        t = LocalResponseNorm(size, alpha=0.3, beta=0.75, k=1.0)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(y, t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
def test_lrn_nonfinite_and_empty_inputs_follow_the_formula(lib, isa):
    x = np.random.default_rng(2).standard_normal((2, 6, 5, 7)).astype(np.float32)
    x[0, 2, 1, 3], x[1, 0, 4, 6], x[1, 5, 0, 0], x[0, 4, 2, 2] = np.nan, np.inf, -np.inf, 0.0
    sess = make_session(lrn_model(size=3), lib, isa=isa)
    y = sess.run(None, {"X": x})[0]
    with np.errstate(invalid="ignore"):
        ref = reference(x, 3)
    # a NaN spreads over the channels whose window holds it; next to an inf, t is inf and y = x * 0
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    assert np.isnan(y).sum() == 3 + 1 + 1 and y[1, 1, 4, 6] == 0.0
    np.testing.assert_allclose(y[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=2e-6, atol=1e-7)
    # stock onnxruntime agrees wherever it is finite (its running window sum turns inf - inf into NaN
    # on channels past the window: an artifact the op does not copy)
    want = stock(x, size=3)
    np.testing.assert_allclose(y[np.isfinite(want)], want[np.isfinite(want)], rtol=2e-6, atol=1e-7)
    for shape in ((0, 6, 5, 7), (2, 0, 5, 7), (2, 6, 0, 7)):
        assert sess.run(None, {"X": np.zeros(shape, np.float32)})[0].shape == shape


@pytest.mark.parametrize("isa", ISAS)
def test_lrn_bitwise_equal_across_threads(lib, isa):
    x = np.random.default_rng(3).standard_normal((3, 16, 45, 45)).astype(np.float32)  # 6 tasks of <= 1024 positions
    model = lrn_model(size=5, alpha=1e-3)
    outs = [make_session(model, lib, threads=t, isa=isa).run(None, {"X": x})[0] for t in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("isa", ISAS)
def test_lrn_every_batch_size(lib, isa):
    rng = np.random.default_rng(5)
    model = lrn_model(size=5, alpha=0.1, beta=0.75, bias=1.5)
    one, two = make_session(model, lib, threads=1, isa=isa), make_session(model, lib, threads=2, isa=isa)
    for n in [*range(1, 71), 256]:
        x = rng.standard_normal((n, 7, 3, 5)).astype(np.float32)
        y = one.run(None, {"X": x})[0]
        np.testing.assert_allclose(y, reference(x, 5, alpha=0.1, bias=1.5), rtol=2e-6, atol=1e-7)
        np.testing.assert_array_equal(two.run(None, {"X": x})[0], y)


def test_lrn_rank_below_three_is_a_clear_error(lib):
    sess = make_session(lrn_model(size=3), lib)
    with pytest.raises(Exception, match=r"LRN node .*rank >= 3\), got rank 2"):
        sess.run(None, {"X": np.ones((2, 6), np.float32)})


def test_fast_form_runs_lrn_in_the_library(lib, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = np.random.default_rng(4).standard_normal((5, 3, 8, 8)).astype(np.float32)
    portable, fast, _, want, got = export_and_run_both_forms(net, tmp_path, torch.zeros(1, 3, 8, 8), x)
    lrn = [n for n in onnx.load(fast).graph.node if n.op_type == "LRN"]
    assert [n.domain for n in lrn] == [kernels.DOMAIN]
    assert [n.domain for n in onnx.load(portable).graph.node if n.op_type == "LRN"] == [""]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # read back, the fast form's LRN is the standard layer again
    back = toolchain.load(fast)
    assert any(isinstance(m, nn.LocalResponseNorm) for m in back.modules())
    np.testing.assert_allclose(back(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_to_fast_ops_leaves_other_domains_and_adds_the_opset_once():
    model = lrn_model("", size=3)
    model.graph.node.append(helper.make_node("LRN", ["Y"], ["Z"], domain="com.other", size=3))
    assert to_fast_ops(model) == 1
    assert [n.domain for n in model.graph.node] == [kernels.DOMAIN, "com.other"]
    assert [o.domain for o in model.opset_import].count(kernels.DOMAIN) == 1
    assert to_fast_ops(model) == 0
