"""Tests for the sparse custom-op library (toolchain/kernels): SparseLinear / SparseConv against
numpy and torch, every ISA path of this CPU, thread-count determinism, validation of corrupted models, build.

Corrupted-model cases run in a subprocess (this file executed as a script), so a crash in the
library fails the test instead of killing pytest.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from toolchain import kernels
from toolchain.errors import ModelFormatError
from toolchain.kernels import build as kbuild
from toolchain.methods.prune import csr


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


_FLAGS = _cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= _FLAGS
HAS_AVX512 = HAS_AVX2 and {"avx512f", "avx512bw", "avx512vl"} <= _FLAGS
ISAS = ["portable"] + (["avx2"] if HAS_AVX2 else []) + (["avx512"] if HAS_AVX512 else [])


@pytest.fixture(scope="session")
def lib() -> Path:
    return kernels.library_path(build=True)


def make_session(model: onnx.ModelProto, lib: Path, threads: int = 1, isa: str | None = None,
                 conv: str | None = None, linear: str | None = None) -> ort.InferenceSession:
    """Session with the ops registered; isa/conv/linear set TOOLCHAIN_KERNELS_ISA/CONV/LINEAR while kernels
    are created."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.register_custom_ops_library(str(lib))
    env = {"TOOLCHAIN_KERNELS_ISA": isa, "TOOLCHAIN_KERNELS_CONV": conv, "TOOLCHAIN_KERNELS_LINEAR": linear}
    saved = {k: os.environ.get(k) for k in env}
    try:
        for key, val in env.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val


def random_sparse(rng, shape, density: float, empty_rows: int = 0) -> np.ndarray:
    w = rng.standard_normal(shape).astype(np.float32)
    w *= rng.random(shape) < density
    if empty_rows:
        w[rng.choice(shape[0], size=min(empty_rows, shape[0]), replace=False)] = 0
    return w


def assert_close(y: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    assert y.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = float(np.abs(y.astype(np.float64) - ref).max(initial=0.0))
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} * {scale:.3g}"


# ------------------------------------------------------------------------------------------------
# csr.py


def test_dense_to_csr_roundtrip_and_dtypes():
    rng = np.random.default_rng(0)
    w = random_sparse(rng, (13, 29), 0.3, empty_rows=3)
    values, col_idx, row_ptr = csr.dense_to_csr(w)
    assert values.dtype == np.float32 and col_idx.dtype == np.uint16 and row_ptr.dtype == np.int32
    assert len(row_ptr) == 14 and row_ptr[0] == 0 and row_ptr[-1] == len(values) == np.count_nonzero(w)
    assert np.all(np.diff(row_ptr) >= 0)
    np.testing.assert_array_equal(csr.csr_to_dense(values, col_idx, row_ptr, 29), w)

    _, c32, _ = csr.dense_to_csr(w, index_dtype=np.int32)
    assert c32.dtype == np.int32
    wide = np.zeros((2, 70000), np.float32)
    wide[1, 69999] = 2.0
    v, c, r = csr.dense_to_csr(wide)
    assert c.dtype == np.int32 and c.tolist() == [69999] and r.tolist() == [0, 0, 1]
    with pytest.raises(ModelFormatError, match="uint16"):
        csr.dense_to_csr(wide, index_dtype=np.uint16)
    with pytest.raises(ModelFormatError, match="2-D"):
        csr.dense_to_csr(np.zeros((2, 3, 4)))
    with pytest.raises(ModelFormatError, match="uint16 or int32"):
        csr.dense_to_csr(w, index_dtype=np.int64)


def test_node_builders_layout():
    w = np.zeros((4, 3, 2, 2), np.float32)
    w[1, 2, 1, 0] = 1.5
    node, tensors = csr.sparse_conv_node("x", "y", w, np.ones(4, np.float32), strides=(2, 1), pads=(1, 0, 1, 0),
                                         group=1, name="c1")
    assert node.domain == kernels.DOMAIN and node.op_type == "SparseConv"
    assert list(node.input) == ["x", "c1.values", "c1.col_idx", "c1.row_ptr", "c1.bias"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"kernel_shape": [2, 2], "strides": [2, 1], "pads": [1, 0, 1, 0], "dilations": [1, 1],
                     "group": 1, "in_channels": 3}
    cols = numpy_helper.to_array(tensors[1])
    assert cols.tolist() == [2 * 4 + 1 * 2 + 0]
    with pytest.raises(ModelFormatError, match="group"):
        csr.sparse_conv_node("x", "y", w, group=3)
    m = csr.make_sparse_linear_model(np.eye(3, dtype=np.float32))
    assert {(o.domain, o.version) for o in m.opset_import} >= {(kernels.DOMAIN, kernels.OPSET_VERSION)}
    assert [a.i for a in m.graph.node[0].attribute if a.name == "in_features"] == [3]


# ------------------------------------------------------------------------------------------------
# SparseLinear

LINEAR_CASES = [
    # M, K, N, density, bias, index dtype, empty rows
    (37, 53, 1, 0.3, True, "uint16", 5),
    (37, 53, 3, 0.3, False, "int32", 5),
    (1, 1, 17, 1.0, True, "uint16", 0),
    (19, 70, 17, 0.0, True, "uint16", 0),       # fully zero layer: output = bias
    (23, 41, 64, 1.0, False, "uint16", 0),      # fully dense
    (130, 333, 64, 0.05, True, "int32", 20),
    (257, 2500, 3, 0.1, True, "uint16", 7),     # several column blocks
    (300, 4500, 64, 0.02, False, "uint16", 0),  # very sparse: one wide sub-block
    (70, 777, 100, 0.5, True, "int32", 3),      # a full and a partial batch tile
    (8, 16, 9, 0.7, False, "uint16", 1),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "M{}K{}N{}d{}".format(*c[:4]))
def test_sparse_linear_matches_numpy(lib, isa, case):
    m, k, n, density, with_bias, idx, empty = case
    rng = np.random.default_rng(m * 1000 + k + n)
    w = random_sparse(rng, (m, k), density, empty)
    b = rng.standard_normal(m).astype(np.float32) if with_bias else None
    x = rng.standard_normal((n, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if b is None else b)
    model = csr.make_sparse_linear_model(w, b, index_dtype=idx)
    for threads in (1, 2):
        y = make_session(model, lib, threads=threads, isa=isa).run(None, {"X": x})[0]
        assert_close(y, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_sparse_linear_every_batch_size(lib, isa):
    """Batch 1..70 covers every tile width (8..64 lanes) and a second, partial tile."""
    rng = np.random.default_rng(9)
    w = random_sparse(rng, (29, 301), 0.2, empty_rows=4)
    b = rng.standard_normal(29).astype(np.float32)
    sess = make_session(csr.make_sparse_linear_model(w, b), lib, isa=isa)
    x = rng.standard_normal((70, 301)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T + b
    for n in range(1, 71):
        assert_close(sess.run(None, {"X": x[:n]})[0], ref[:n])


def test_sparse_linear_batch_256_and_wide_int32(lib):
    rng = np.random.default_rng(5)
    w = random_sparse(rng, (96, 1200), 0.1)
    x = rng.standard_normal((256, 1200)).astype(np.float32)
    y = make_session(csr.make_sparse_linear_model(w), lib, threads=2).run(None, {"X": x})[0]
    assert_close(y, x.astype(np.float64) @ w.T)

    # K > 65536 needs int32 column indices
    w = random_sparse(rng, (5, 70001), 0.01)
    w[:, -1] = 1.0
    model = csr.make_sparse_linear_model(w, np.arange(5, dtype=np.float32))
    assert model.graph.initializer[1].data_type == TensorProto.INT32
    x = rng.standard_normal((3, 70001)).astype(np.float32)
    for n in (1, 3):
        y = make_session(model, lib).run(None, {"X": x[:n]})[0]
        assert_close(y, x[:n].astype(np.float64) @ w.T + np.arange(5))


def test_sparse_linear_shapes(lib):
    rng = np.random.default_rng(6)
    w = random_sparse(rng, (7, 11), 0.5)
    model = csr.make_sparse_linear_model(w)
    model.graph.input[0].type.tensor_type.shape.ClearField("dim")  # any rank
    model.graph.output[0].type.tensor_type.shape.ClearField("dim")
    sess = make_session(model, lib)
    x = rng.standard_normal((2, 3, 11)).astype(np.float32)
    assert_close(sess.run(None, {"X": x})[0], x.astype(np.float64) @ w.T)
    assert sess.run(None, {"X": np.zeros((0, 11), np.float32)})[0].shape == (0, 7)
    with pytest.raises(Exception, match="X has 12 features .* in_features is 11"):
        sess.run(None, {"X": np.zeros((2, 12), np.float32)})
    with pytest.raises(Exception, match="rank >= 2"):
        sess.run(None, {"X": np.zeros((11,), np.float32)})


def test_optional_bias_by_empty_name(lib):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = csr.make_sparse_linear_model(w)
    model.graph.node[0].input.append("")
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(make_session(model, lib).run(None, {"X": x})[0], x @ w.T)


@pytest.mark.skipif(not HAS_AVX2, reason="CPU without AVX2/FMA")
def test_isa_env_switches_kernels(lib):
    # Different summation orders (FMA, 8 or 16 lanes) make the paths differ in the last bits.
    rng = np.random.default_rng(7)
    w = random_sparse(rng, (200, 3000), 0.3)
    model = csr.make_sparse_linear_model(w)
    for n in (1, 5):
        x = rng.standard_normal((n, 3000)).astype(np.float32)
        out = {isa: make_session(model, lib, isa=isa).run(None, {"X": x})[0] for isa in ISAS}
        assert not np.array_equal(out["avx2"], out["portable"])
        for y in out.values():
            assert_close(y, x.astype(np.float64) @ w.T)
        auto = make_session(model, lib).run(None, {"X": x})[0]
        np.testing.assert_array_equal(auto, out[ISAS[-1]])  # auto takes the widest path the CPU has


def test_huge_page_placement_changes_no_result(lib, monkeypatch):
    # weights of more than 1 MiB go on 2 MiB-aligned, madvise(MADV_HUGEPAGE) memory unless
    # TOOLCHAIN_KERNELS_HUGEPAGES=0: the same numbers either way, batch 1 and batched, fp32 and packed
    from toolchain.methods.quantize import packed

    rng = np.random.default_rng(21)
    w = random_sparse(rng, (700, 4096), 0.1)  # 287k non-zeros: 1.1 MiB of values
    b = rng.standard_normal(700).astype(np.float32)
    models = [csr.make_sparse_linear_model(w, b), packed.make_packed_linear_model(packed.encode_int8(w), b)]
    xs = [rng.standard_normal((n, 4096)).astype(np.float32) for n in (1, 33)]
    for model in models:
        outs = {}
        for setting in ("1", "0"):
            monkeypatch.setenv("TOOLCHAIN_KERNELS_HUGEPAGES", setting)
            sess = make_session(model, lib)
            outs[setting] = [sess.run(None, {"X": x})[0] for x in xs]
        for a, c in zip(outs["1"], outs["0"]):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("isa", ISAS)
def test_deterministic_across_runs_and_threads(lib, isa):
    rng = np.random.default_rng(8)
    w = random_sparse(rng, (300, 2100), 0.2)
    b = rng.standard_normal(300).astype(np.float32)
    model = csr.make_sparse_linear_model(w, b)
    wc = random_sparse(rng, (40, 12, 3, 3), 0.4)
    cmodel = csr.make_sparse_conv_model(wc, None, pads=(1, 1, 1, 1), group=2)
    xc = rng.standard_normal((2, 24, 19, 17)).astype(np.float32)
    for n in (1, 3, 64, 100):  # 3: one batch-1 product per row of X
        x = rng.standard_normal((n, 2100)).astype(np.float32)
        outs = []
        for threads in (1, 2, 3):
            sess = make_session(model, lib, threads=threads, isa=isa)
            outs += [sess.run(None, {"X": x})[0], sess.run(None, {"X": x})[0]]
        for y in outs[1:]:
            np.testing.assert_array_equal(y, outs[0])
    for algo in ("im2col", "direct", "batch"):
        outs = [make_session(cmodel, lib, threads=t, isa=isa, conv=algo).run(None, {"X": xc})[0] for t in (1, 2, 3)]
        for y in outs[1:]:
            np.testing.assert_array_equal(y, outs[0])


# ------------------------------------------------------------------------------------------------
# SparseConv


def torch_conv(x, w, b, strides, pads, dilations, group):
    xt = F.pad(torch.from_numpy(x).double(), (pads[1], pads[3], pads[0], pads[2]))
    bt = None if b is None else torch.from_numpy(b).double()
    return F.conv2d(xt, torch.from_numpy(w).double(), bt, stride=strides, dilation=dilations, groups=group).numpy()


def random_conv_cases(count: int, seed: int = 11):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        g = int(rng.choice([1, 1, 2, 3]))
        cg, mg = int(rng.integers(1, 6)), int(rng.integers(1, 7))
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        pads = tuple(int(p) for p in rng.integers(0, 3, size=4))
        h, w = int(rng.integers(1, 16)), int(rng.integers(1, 16))
        if h + pads[0] + pads[2] < dh * (kh - 1) + 1 or w + pads[1] + pads[3] < dw * (kw - 1) + 1:
            continue
        cases.append(dict(n=int(rng.integers(1, 4)), c=cg * g, m=mg * g, h=h, w=w, k=(kh, kw), strides=(sh, sw),
                          pads=pads, dilations=(dh, dw), group=g, density=float(rng.choice([0.0, 0.3, 0.7, 1.0])),
                          bias=bool(rng.integers(0, 2)), idx=str(rng.choice(["uint16", "int32"]))))
    return cases


CONV_CASES = random_conv_cases(24) + [
    # stride-1 cases for the direct algorithm, and one with several column blocks (C/g*kh*kw > 2048)
    dict(n=2, c=6, m=10, h=13, w=9, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1,
         density=0.5, bias=True, idx="uint16"),
    dict(n=1, c=8, m=6, h=12, w=12, k=(5, 3), strides=(1, 1), pads=(0, 2, 1, 0), dilations=(2, 1), group=2,
         density=0.4, bias=False, idx="int32"),
    dict(n=1, c=260, m=70, h=6, w=7, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1,
         density=0.35, bias=True, idx="uint16"),
    dict(n=1, c=3, m=16, h=40, w=37, k=(11, 11), strides=(4, 4), pads=(0, 0, 0, 0), dilations=(1, 1), group=1,
         density=0.84, bias=True, idx="uint16"),
    # the images-in-lanes algorithm: several lane tiles, split evenly (70: 2 x 40; 130: 48 + 48 + 34)
    dict(n=70, c=4, m=6, h=7, w=6, k=(3, 2), strides=(1, 2), pads=(1, 0, 2, 1), dilations=(1, 2), group=2,
         density=0.4, bias=True, idx="uint16"),
    dict(n=130, c=3, m=5, h=5, w=5, k=(3, 3), strides=(2, 1), pads=(1, 1, 1, 1), dilations=(1, 1), group=1,
         density=0.3, bias=False, idx="int32"),
]


@pytest.mark.parametrize("algo", ["im2col", "direct", "batch"])
@pytest.mark.parametrize("isa", ISAS)
def test_sparse_conv_matches_torch(lib, isa, algo):
    for i, c in enumerate(CONV_CASES):
        rng = np.random.default_rng(100 + i)
        wt = random_sparse(rng, (c["m"], c["c"] // c["group"], *c["k"]), c["density"])
        b = rng.standard_normal(c["m"]).astype(np.float32) if c["bias"] else None
        x = rng.standard_normal((c["n"], c["c"], c["h"], c["w"])).astype(np.float32)
        model = csr.make_sparse_conv_model(wt, b, input_hw=(c["h"], c["w"]), strides=c["strides"], pads=c["pads"],
                                           dilations=c["dilations"], group=c["group"], index_dtype=c["idx"])
        ref = torch_conv(x, wt, b, c["strides"], c["pads"], c["dilations"], c["group"])
        y = make_session(model, lib, threads=1 + i % 2, isa=isa, conv=algo).run(None, {"X": x})[0]
        try:
            assert_close(y, ref)
        except AssertionError as e:
            raise AssertionError(f"case {i} {c}: {e}") from None


@pytest.mark.parametrize("isa", ISAS)
def test_sparse_conv_every_batch_size(lib, isa):
    # the automatic choice changes algorithm with the batch (images in lanes from 16): every size agrees
    rng = np.random.default_rng(13)
    wt = random_sparse(rng, (6, 4, 3, 3), 0.3)
    b = rng.standard_normal(6).astype(np.float32)
    sess = make_session(csr.make_sparse_conv_model(wt, b, input_hw=(6, 5), pads=(1, 0, 1, 1)), lib, isa=isa)
    for n in [*range(1, 71), 256]:
        x = rng.standard_normal((n, 4, 6, 5)).astype(np.float32)
        assert_close(sess.run(None, {"X": x})[0], torch_conv(x, wt, b, (1, 1), (1, 0, 1, 1), (1, 1), 1))


def test_sparse_conv_without_in_channels(lib):
    rng = np.random.default_rng(12)
    wt = random_sparse(rng, (6, 4, 3, 3), 0.5)
    wt[:, -1] = 0.5  # make the largest column index present
    model = csr.make_sparse_conv_model(wt, None, pads=(1, 1, 1, 1))
    attrs = model.graph.node[0].attribute
    del attrs[[a.name for a in attrs].index("in_channels")]
    model.graph.input[0].type.tensor_type.shape.ClearField("dim")
    sess = make_session(model, lib)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert_close(sess.run(None, {"X": x})[0], torch_conv(x, wt, None, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    with pytest.raises(Exception, match="X has 3 channels"):
        sess.run(None, {"X": np.zeros((1, 3, 8, 8), np.float32)})


# ------------------------------------------------------------------------------------------------
# Corrupted models: every validation rule, in a subprocess.


def _linear_model_weights() -> np.ndarray:
    w = random_sparse(np.random.default_rng(3), (6, 10), 0.5)
    w[0, 9] = 1.0  # row 0 non-empty, largest column used
    return w


def _linear_model(**replace) -> onnx.ModelProto:
    """Valid SparseLinear 'fc' [6, 10] with bias; keyword arrays replace initializers fc.<name>."""
    model = csr.make_sparse_linear_model(_linear_model_weights(), np.ones(6, np.float32), name="fc")
    for name, arr in replace.items():
        _replace(model, f"fc.{name}", arr)
    return model


def _packed_model() -> onnx.ModelProto:
    """Valid SparseLinearInt8 'fc' [6, 10] (the linear model's weights)."""
    from toolchain.methods.quantize import packed

    return packed.make_packed_linear_model(packed.encode_int8(_linear_model_weights()), None)


def _conv_model() -> onnx.ModelProto:
    """Valid grouped conv: weight [4, 2, 3, 3], group 2, so X has 4 channels."""
    return csr.make_sparse_conv_model(np.ones((4, 2, 3, 3), np.float32), None, name="conv", group=2)


def export_and_run_both_forms(net, tmp_path, example, x: np.ndarray):
    """Export `net` in the portable and the fast form (toolchain.export) and run both on x in onnxruntime:
    (portable path, fast path, input name, portable output, fast output)."""
    import toolchain

    portable, fast = tmp_path / "p.onnx", tmp_path / "f.onnx"
    toolchain.export(net, portable, example_input=example)
    toolchain.export(net, fast, form="fast", example_input=example)
    ref = ort.InferenceSession(str(portable), providers=["CPUExecutionProvider"])
    name = ref.get_inputs()[0].name
    got = ort.InferenceSession(str(fast), kernels.session_options(1), providers=["CPUExecutionProvider"]).run(
        None, {name: x})[0]
    return portable, fast, name, ref.run(None, {name: x})[0], got


def lrn_model(domain: str = kernels.DOMAIN, **attrs) -> onnx.ModelProto:
    """One LRN node with these attributes: the library's (domain ai.toolchain) or, with domain "", ONNX's."""
    node = helper.make_node("LRN", ["X"], ["Y"], domain=domain, **attrs)
    graph = helper.make_graph([node], "lrn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


@functools.lru_cache(maxsize=None)
def _corrupt_cases():
    """name -> (model, input array, expected message fragment)."""
    v, c, r = csr.dense_to_csr(_linear_model_weights())
    x = np.ones((2, 10), np.float32)
    xc = np.ones((1, 4, 6, 6), np.float32)
    cases = {
        "row_ptr_start": (_linear_model(row_ptr=np.r_[1, r[1:]].astype(np.int32)), x, "row_ptr[0] must be 0"),
        "row_ptr_decreasing": (_linear_model(row_ptr=np.r_[r[:3], r[2] - 1, r[4:]].astype(np.int32)), x,
                               "non-decreasing"),
        "row_ptr_end": (_linear_model(row_ptr=np.r_[r[:-1], r[-1] - 1].astype(np.int32)), x,
                        "must equal the number of non-zeros"),
        "row_ptr_too_short": (_linear_model(row_ptr=np.zeros(1, np.int32)), x, "M+1 >= 2"),
        "row_ptr_length": (_linear_model(row_ptr=r[:-1]), x, "must equal the number of non-zeros"),
        "row_ptr_dtype": (_linear_model(row_ptr=r.astype(np.int64)), x, "row_ptr"),
        "values_length": (_linear_model(values=v[:-1]), x, "col_idx has"),
        "col_idx_range_u16": (_linear_model(col_idx=np.r_[c[:-1], 10].astype(np.uint16)), x, "out of range"),
        "col_idx_range_i32": (_linear_model(col_idx=np.r_[c[:-1].astype(np.int32), 65537].astype(np.int32)), x,
                              "out of range"),
        "col_idx_negative": (_linear_model(col_idx=np.r_[c[:-1].astype(np.int32), -1].astype(np.int32)), x,
                             "is negative"),
        "col_idx_dtype": (_linear_model(col_idx=c.astype(np.int64)), x, "uint16 or int32"),
        "col_idx_rank": (_linear_model(col_idx=c.reshape(1, -1)), x, "col_idx must be 1-D"),
        "bias_length": (_linear_model(bias=np.ones(5, np.float32)), x, "bias must have shape"),
        "missing_in_features": (_without_attr(_linear_model(), "in_features"), x, "in_features"),
        "not_constant": (_as_graph_input(_linear_model(), "fc.values"), x, "must be a constant initializer"),
        "x_features": (_symbolic_input(_linear_model()), np.ones((2, 9), np.float32), "in_features is 10"),
        "isa_env": (_linear_model(), x, "TOOLCHAIN_KERNELS_ISA=sse9 is not one of auto, avx512, avx2, portable"),
        "hugepages_env": (_linear_model(), x, "TOOLCHAIN_KERNELS_HUGEPAGES=yes is not 0 or 1"),
        "linear_env": (_linear_model(), x, "TOOLCHAIN_KERNELS_LINEAR=rows is not one of auto, rowwise, tile"),
        "conv_col_range": (_replace(_conv_model(), "conv.col_idx", np.r_[np.zeros(71), 18].astype(np.uint16)), xc,
                           "out of range"),
        "conv_valid": (_conv_model(), xc, None),  # control: a valid grouped model runs
        "conv_group_bad": (_set_attr(_conv_model(), "group", 3), xc, "in_channels=4 must be a positive multiple"),
        "conv_m_group": (_set_attr(_set_attr(_conv_model(), "group", 3), "in_channels", 6), xc,
                         "not divisible by group"),
        "conv_kernel_shape": (_set_attr(_conv_model(), "kernel_shape", [3]), xc, "kernel_shape"),
        "conv_strides": (_set_attr(_conv_model(), "strides", [0, 1]), xc, "strides"),
        "conv_pads": (_set_attr(_conv_model(), "pads", [1, 1, -1, 1]), xc, "pads"),
        "conv_auto_pad": (_set_attr(_conv_model(), "auto_pad", "SAME_UPPER"), xc, "auto_pad"),
        "conv_channels": (_symbolic_input(_conv_model()), np.ones((1, 5, 6, 6), np.float32), "in_channels is 4"),
        "conv_too_small": (_symbolic_input(_conv_model()), np.ones((1, 4, 2, 6), np.float32), "smaller than"),
        "conv_pool_valid": (_set_attr(_conv_model(), "max_pool", [2, 2]), xc, None),
        "conv_pool_rank": (_set_attr(_conv_model(), "max_pool", [2]), xc, "max_pool must be 2 positive ints"),
        "conv_pool_zero": (_set_attr(_conv_model(), "max_pool", [2, 0]), xc, "max_pool must be 2 positive ints"),
        "conv_pool_huge": (_set_attr(_conv_model(), "max_pool", [2, 1 << 40]), xc, "max_pool must be 2 positive ints"),
        "conv_pool_window": (_symbolic_input(_set_attr(_conv_model(), "max_pool", [5, 1])), xc,
                             "output 4x4 is smaller than the max_pool window 5x1"),
        "conv_activation": (_set_attr(_conv_model(), "activation", "Sigmoid"), xc,
                            'activation must be "Relu" or absent, got "Sigmoid"'),
        "linear_activation": (_set_attr(_linear_model(), "activation", "relu"), x,
                              'activation must be "Relu" or absent, got "relu"'),
        "linear_relu_valid": (_set_attr(_linear_model(), "activation", "Relu"), x, None),
        "packed_activation": (_set_attr(_packed_model(), "activation", "Tanh"), x,
                              'activation must be "Relu" or absent, got "Tanh"'),
        "lrn_valid": (lrn_model(size=3), xc, None),
        "lrn_missing_size": (lrn_model(alpha=1e-4), xc, "missing required int attribute 'size'"),
        "lrn_size_zero": (lrn_model(size=0), xc, "size must be in [1, 65536], got 0"),
        "lrn_alpha_inf": (lrn_model(size=3, alpha=float("inf")), xc, "attribute alpha must be finite, got inf"),
        "lrn_beta_nan": (lrn_model(size=3, beta=float("nan")), xc, "attribute beta must be finite, got nan"),
        "lrn_rank": (lrn_model(size=3), np.ones((2, 4), np.float32), "rank >= 3), got rank 2"),
    }
    return cases


def _replace(model, name, arr):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
    return model


def _without_attr(model, name):
    attrs = model.graph.node[0].attribute
    del attrs[[a.name for a in attrs].index(name)]
    return model


def _set_attr(model, name, value):
    attrs = model.graph.node[0].attribute
    if name in [a.name for a in attrs]:
        _without_attr(model, name)
    attrs.append(helper.make_attribute(name, value))
    return model


def _as_graph_input(model, name):
    t = next(t for t in model.graph.initializer if t.name == name)
    model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return model


def _symbolic_input(model):
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.ClearField("dim")
    return model


def _run_corrupt_cases(lib_path: str) -> dict:
    results = {}
    for name, (model, x, _) in _corrupt_cases().items():
        if name == "isa_env":
            os.environ["TOOLCHAIN_KERNELS_ISA"] = "sse9"
        if name == "hugepages_env":
            os.environ["TOOLCHAIN_KERNELS_HUGEPAGES"] = "yes"
        if name == "linear_env":
            os.environ["TOOLCHAIN_KERNELS_LINEAR"] = "rows"
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4
            so.register_custom_ops_library(lib_path)
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            sess.run(None, {"X": x})
            results[name] = None
        except Exception as e:  # noqa: BLE001 - report any error message
            results[name] = f"{type(e).__name__}: {e}"
        finally:
            os.environ.pop("TOOLCHAIN_KERNELS_ISA", None)
            os.environ.pop("TOOLCHAIN_KERNELS_HUGEPAGES", None)
            os.environ.pop("TOOLCHAIN_KERNELS_LINEAR", None)
    return results


@pytest.fixture(scope="module")
def corrupt_results(lib):
    proc = subprocess.run([sys.executable, __file__, "corrupt", str(lib)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"subprocess crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(_corrupt_cases()))
def test_corrupted_model_gives_clear_error(corrupt_results, name):
    expected = _corrupt_cases()[name][2]
    got = corrupt_results[name]
    if expected is None:
        assert got is None, f"valid model failed: {got}"
        return
    assert got is not None, "no error raised"
    assert expected in got, got
    assert len(got.splitlines()) == 1 and "Traceback" not in got
    if name not in ("row_ptr_dtype",):  # ORT's own type check names the input, not our node
        assert "node '" in got or "TOOLCHAIN_KERNELS_" in got, got


# ------------------------------------------------------------------------------------------------
# Build and Python API


def test_library_path_and_register(lib):
    assert lib.is_file() and lib == kernels.library_path(build=False)
    mtime = lib.stat().st_mtime_ns
    assert kernels.library_path() == lib and lib.stat().st_mtime_ns == mtime  # up to date: not rebuilt
    assert not kbuild.is_stale(lib)
    so = ort.SessionOptions()
    assert kernels.register(so) == lib
    sess = ort.InferenceSession(csr.make_sparse_linear_model(np.eye(4, dtype=np.float32) * 2).SerializeToString(),
                                so, providers=["CPUExecutionProvider"])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(sess.run(None, {"X": x})[0], 2 * x)


def test_build_cli(lib, capsys):
    assert kbuild.main([]) == 0
    assert capsys.readouterr().out.strip() == str(lib)


def test_build_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(kbuild.BuildError, match="compiler 'no-such-compiler-xyz' not found"):
        kbuild.build(force=True)
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(kbuild.BuildError, match="ORT_INCLUDE_DIR.*onnxruntime_c_api.h"):
        kbuild.find_headers()
    monkeypatch.delenv("ORT_INCLUDE_DIR")
    monkeypatch.setenv("TOOLCHAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    with pytest.raises(kbuild.BuildError, match="npm not found"):
        kbuild.find_headers()


def test_ort_include_dir_is_used_as_is(monkeypatch, tmp_path):
    (tmp_path / "onnxruntime_c_api.h").write_text("/* user's headers */\n")
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", "")  # must not need npm
    assert kbuild.find_headers() == tmp_path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "corrupt":
        print(json.dumps(_run_corrupt_cases(sys.argv[2])))
    else:
        sys.exit(f"usage: {sys.argv[0]} corrupt LIBRARY")


# ------------------------------------------------------------------------------------------------
# Non-finite inputs: the fast form follows the dense product (0 * NaN = 0 * Inf = NaN).


def _dense_linear(x, w, b):
    """Elementwise reference (no BLAS, which may skip zeros): every weight times every input."""
    y = (x[:, None, :].astype(np.float64) * w[None, :, :]).sum(-1)
    return y if b is None else y + b


def _dense_conv(x, w, b, strides, pads, group):
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (xp.shape[2] - kh) // strides[0] + 1
    ow = (xp.shape[3] - kw) // strides[1] + 1
    y = np.zeros((n, m, oh, ow))
    mg = m // group
    for g in range(group):
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg:(g + 1) * cg, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
                y[:, g * mg:(g + 1) * mg, i, j] = (patch[:, None] * w[None, g * mg:(g + 1) * mg]).sum((2, 3, 4))
    return y if b is None else y + b[None, :, None, None]


def _poison(x, rng, count):
    flat = x.reshape(-1)
    where = rng.choice(flat.size, size=count, replace=False)
    flat[where] = rng.choice([np.nan, np.inf, -np.inf], size=count)
    return x


def _assert_same_nonfinite(y, ref):
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
    fin = np.isfinite(ref)
    assert_close(np.where(fin, y, 0), np.where(fin, ref, 0))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("form", ["linear", "codebook4", "codebook8", "int8"])
def test_linear_forms_follow_dense_on_nonfinite_inputs(lib, isa, form):
    from toolchain.methods.quantize import packed

    rng = np.random.default_rng(61)
    w = random_sparse(rng, (37, 300), 0.3, empty_rows=3)
    w[:, 7] = 0  # a column no row stores
    b = rng.standard_normal(37).astype(np.float32)
    if form == "linear":
        model, wd = csr.make_sparse_linear_model(w, b), w
    else:
        p = packed.encode_int8(w) if form == "int8" else packed.encode_codebook(
            w, rng.standard_normal(16 if form == "codebook4" else 256).astype(np.float32), 4 if form == "codebook4" else 8)
        model, wd = packed.make_packed_linear_model(p, b), packed.decode(p)
    sess = make_session(model, lib, isa=isa)
    for n in (1, 3, 5, 70):  # 1 and 3: batch-1 products per row of X; 5, 70: tile products
        x = rng.standard_normal((n, 300)).astype(np.float32)
        _poison(x, rng, 1 + n // 3)
        x[0, 7] = np.nan  # column 7: every output of row 0 becomes NaN
        with np.errstate(invalid="ignore"):
            ref = _dense_linear(x, wd, b)
        y = sess.run(None, {"X": x})[0]
        assert np.isnan(y[0]).all()
        _assert_same_nonfinite(y, ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [34, 37, 4101])
def test_batch1_padding_lanes_ignore_x(lib, isa, k):
    # The batch-1 layout pads each row's last chunk of 8 entries with value 0 and column offset 0 (kernels.h):
    # those lanes must not multiply x at the block's first column. With every weight stored and positive and
    # every input +Inf or -Inf, each output is +-Inf; a padding lane that read x would make it NaN. K = 34, 37
    # and 4101 (three blocks of 1367 columns) leave 2, 5 and 7 real entries in the last chunks.
    rng = np.random.default_rng(71)
    w = rng.uniform(0.5, 1.5, (21, k)).astype(np.float32)
    sess = make_session(csr.make_sparse_linear_model(w, None), lib, isa=isa)
    for n in (1, 2, 3):  # all batch-1 products (one per row of X)
        x = np.where(rng.random((n, k)) < 0.5, np.inf, -np.inf).astype(np.float32)
        x[:, 1:] = x[:, :1]  # one sign per row of X: the sum is that infinity
        y = sess.run(None, {"X": x})[0]
        np.testing.assert_array_equal(y, np.repeat(x[:, :1], 21, axis=1))


@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_scan_sees_every_position(lib, isa):
    # only column 0 is stored, so an Inf or NaN elsewhere reaches the outputs through the scan alone
    # (KernelTable::all_finite: vector blocks of 64 / 16 / 8 values, a masked or scalar tail)
    w = np.zeros((4, 150), np.float32)
    w[:, 0] = 1.0
    sess = make_session(csr.make_sparse_linear_model(w, None), lib, isa=isa)
    for n in (1, 3):
        for i in range(1, n * 150):
            if i % 150 == 0:
                continue
            x = np.ones((n, 150), np.float32)
            x.flat[i] = (np.inf, -np.inf, np.nan)[i % 3]
            y = sess.run(None, {"X": x})[0]
            row = i // 150
            assert np.isnan(y[row]).all() and np.isfinite(np.delete(y, row, axis=0)).all(), (n, i)


@pytest.mark.parametrize("algo", ["im2col", "direct", "batch"])
@pytest.mark.parametrize("isa", ISAS)
def test_sparse_conv_follows_dense_on_nonfinite_inputs(lib, isa, algo):
    rng = np.random.default_rng(62)
    for strides, pads, group in (((1, 1), (1, 0, 2, 1), 1), ((2, 1), (0, 1, 1, 0), 2), ((1, 1), (0, 0, 0, 0), 3)):
        wt = random_sparse(rng, (6, 6 // group, 3, 2), 0.4)
        b = rng.standard_normal(6).astype(np.float32)
        x = rng.standard_normal((2, 6, 7, 6)).astype(np.float32)
        _poison(x, rng, 4)
        model = csr.make_sparse_conv_model(wt, b, input_hw=(7, 6), strides=strides, pads=pads, group=group)
        with np.errstate(invalid="ignore"):
            ref = _dense_conv(x, wt, b, strides, pads, group)
        y = make_session(model, lib, isa=isa, conv=algo).run(None, {"X": x})[0]
        assert np.isnan(y).any()
        _assert_same_nonfinite(y, ref)
