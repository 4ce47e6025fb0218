"""Packed sparse formats (toolchain/methods/quantize/packed.py, SparseLinearCodebook / SparseLinearInt8) and ISA dispatch:
encoder/decoder round trips, every format x every ISA path of this CPU x a sample of batch sizes against the numpy
reference decoder, bitwise equality across 1 and 2 threads, and corrupted files (in a subprocess, so a crash in the
library fails a test instead of killing pytest).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from test_kernels import ISAS, assert_close, make_session, random_sparse
from toolchain import kernels
from toolchain.errors import ModelFormatError
from toolchain.methods.prune import csr
from toolchain.methods.quantize import packed

FORMATS = ["codebook4", "codebook8", "int8"]
BATCHES = [1, 2, 5, 8, 9, 16, 23, 31, 40, 57, 64, 65, 70, 256]


@pytest.fixture(scope="session")
def lib():
    return kernels.library_path(build=True)


def encode(fmt: str, w: np.ndarray, rng) -> packed.PackedCodebook | packed.PackedInt8:
    if fmt == "int8":
        return packed.encode_int8(w)
    bits = 4 if fmt == "codebook4" else 8
    cb = rng.standard_normal(1 << bits).astype(np.float32)
    return packed.encode_codebook(w, cb, bits)


# ------------------------------------------------------------------------------------------------
# Encoders and reference decoders


def test_entries_and_fillers():
    w = np.zeros((4, 1000), np.float32)
    w[0, [0, 255, 256, 999]] = [1, 2, 3, 4]  # gap 743 from 256 to 999: two fillers (d = 0), then 233
    w[1, 600] = 5                            # 601 from the row start (-1): two fillers, then 91
    w[3, 255] = 6                            # 256 from the row start: one filler, then 1
    p = packed.encode_int8(w)
    assert p.row_ptr.tolist() == [0, 6, 9, 9, 11]
    assert p.deltas.tolist() == [1, 255, 1, 0, 0, 233, 0, 0, 91, 0, 1]
    assert p.fillers == 5 and np.all(p.values[p.deltas == 0] == 0) and np.all(p.values[p.deltas != 0] != 0)
    np.testing.assert_allclose(packed.decode_int8(p), w, rtol=1 / 127)

    cb = np.arange(1, 17, dtype=np.float32)  # a full 4-bit codebook: fillers spend no codebook value
    c = packed.encode_codebook(w, cb, 4)
    assert c.fillers == 5 and len(c.codebook) == 16
    assert len(c.codes) == (len(c.deltas) + 1) // 2
    np.testing.assert_array_equal(packed.decode_codebook(c), w)
    assert c.nbytes() == 16 * 4 + len(c.codes) + len(c.deltas) + 5 * 4


def test_codebook_nearest_codes_and_errors():
    rng = np.random.default_rng(1)
    w = random_sparse(rng, (20, 300), 0.3)
    cb = np.linspace(-2, 2, 16).astype(np.float32)
    c = packed.encode_codebook(w, cb, 4)
    d = packed.decode_codebook(c)
    mask = w != 0
    nearest = cb[np.abs(w[mask][:, None] - cb[None, :]).argmin(axis=1)]
    np.testing.assert_array_equal(d[mask], nearest)
    assert not np.any(d[~mask])
    # explicit cluster assignment (what a weight-sharing method passes)
    codes = rng.integers(0, 16, size=w.shape)
    d2 = packed.decode_codebook(packed.encode_codebook(w, cb, 4, codes=codes))
    np.testing.assert_array_equal(d2[mask], cb[codes[mask]])
    c8 = packed.encode_codebook(w, np.linspace(-3, 3, 256), 8)
    assert len(c8.codes) == len(c8.deltas)

    with pytest.raises(ModelFormatError, match="bits must be 4 or 8"):
        packed.encode_codebook(w, cb, 5)
    with pytest.raises(ModelFormatError, match="holds 1..16"):
        packed.encode_codebook(w, np.arange(17, dtype=np.float32), 4)
    with pytest.raises(ModelFormatError, match="finite"):
        packed.encode_codebook(w, np.array([np.nan, 1], np.float32), 4)
    with pytest.raises(ModelFormatError, match="index the 16-entry"):
        packed.encode_codebook(w, cb, 4, codes=codes + 16)
    with pytest.raises(ModelFormatError, match="2-D"):
        packed.encode_int8(np.zeros(5))
    with pytest.raises(ModelFormatError, match="finite and non-zero"):
        packed.encode_int8(w, scales=np.zeros(20))


def test_int8_quantization_error_bound():
    rng = np.random.default_rng(2)
    w = random_sparse(rng, (30, 500), 0.2, empty_rows=3)
    p = packed.encode_int8(w)
    s = packed.int8_scales(w)
    assert np.all(np.abs(packed.decode_int8(p) - w) <= s[:, None] * 0.5 + 1e-7)
    assert p.values.dtype == np.int8 and np.abs(p.values.astype(int)).max() <= 127


# ------------------------------------------------------------------------------------------------
# Kernels: every format x ISA x batch sample against the reference decoder


def _fuzz_weights(rng):
    """(M, K, density) shapes: one row block, several column blocks (K > 2048), long gaps, empty rows."""
    return [(37, 301, 0.2), (130, 2500, 0.1), (9, 5000, 0.004), (64, 1000, 0.6)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_linear_matches_reference(lib, fmt, isa):
    rng = np.random.default_rng(hash((fmt, isa)) % 2**32)
    for m, k, density in _fuzz_weights(rng):
        w = random_sparse(rng, (m, k), density, empty_rows=3)
        p = encode(fmt, w, rng)
        wd = packed.decode(p).astype(np.float64)
        b = rng.standard_normal(m).astype(np.float32) if m % 2 else None
        model = packed.make_packed_linear_model(p, b)
        s1 = make_session(model, lib, threads=1, isa=isa)
        s2 = make_session(model, lib, threads=2, isa=isa)
        x = rng.standard_normal((max(BATCHES), k)).astype(np.float32)
        ref = x.astype(np.float64) @ wd.T + (0 if b is None else b)
        for n in BATCHES[(m + k) % 3::3] + [1, 256]:  # a third of the sample per shape, 1 and 256 always
            y1 = s1.run(None, {"X": x[:n]})[0]
            assert_close(y1, ref[:n])
            np.testing.assert_array_equal(s2.run(None, {"X": x[:n]})[0], y1)


@pytest.mark.parametrize("isa", ISAS)
def test_packed_every_batch_size_1_to_70(lib, isa):
    rng = np.random.default_rng(4)
    w = random_sparse(rng, (21, 2100), 0.15, empty_rows=2)
    for fmt in FORMATS:
        p = encode(fmt, w, rng)
        sess = make_session(packed.make_packed_linear_model(p), lib, isa=isa)
        x = rng.standard_normal((70, 2100)).astype(np.float32)
        ref = x.astype(np.float64) @ packed.decode(p).astype(np.float64).T
        for n in range(1, 71):
            assert_close(sess.run(None, {"X": x[:n]})[0], ref[:n])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("linear", ["auto", "rowwise", "tile"])
def test_linear_batch_paths(lib, isa, linear):
    """TOOLCHAIN_KERNELS_LINEAR: `rowwise` runs every batch as batch-1 products (each row of Y then equals the
    batch-1 output bitwise), `tile` runs batches >= 2 as tile products, `auto` takes batch-1 products up to
    batch 3. All of them match the float64 reference, fp32 and packed."""
    rng = np.random.default_rng(21)
    w = random_sparse(rng, (29, 1301), 0.15, empty_rows=3)
    b = rng.standard_normal(29).astype(np.float32)
    x = rng.standard_normal((70, 1301)).astype(np.float32)
    models = {"fp32": (csr.make_sparse_linear_model(w, b), w)}
    for fmt in ("codebook4", "int8"):
        p = encode(fmt, w, rng)
        models[fmt] = (packed.make_packed_linear_model(p, b), packed.decode(p))
    for name, (model, wd) in models.items():
        sess = make_session(model, lib, isa=isa, linear=linear)
        ref = x.astype(np.float64) @ wd.astype(np.float64).T + b
        single = np.concatenate([sess.run(None, {"X": x[i:i + 1]})[0] for i in range(5)])
        for n in (1, 2, 3, 4, 5, 9, 70):
            y = sess.run(None, {"X": x[:n]})[0]
            assert_close(y, ref[:n])
            if linear == "rowwise" or (linear == "auto" and n <= 3):
                np.testing.assert_array_equal(y[:5], single[:n], err_msg=f"{name} batch {n}")


def test_packed_wide_rows_many_fillers(lib):
    """K > 65536 (block-relative indices) and long gaps (filler runs) on every path."""
    rng = np.random.default_rng(7)
    w = random_sparse(rng, (5, 70001), 0.003)
    w[:, -1] = 1.0
    w[3, 0] = 2.0
    w[2] = 0
    for fmt in FORMATS:
        p = encode(fmt, w, rng)
        assert p.fillers > 100
        wd = packed.decode(p).astype(np.float64)
        x = rng.standard_normal((3, 70001)).astype(np.float32)
        for isa in ISAS:
            sess = make_session(packed.make_packed_linear_model(p), lib, isa=isa)
            for n in (1, 3):
                assert_close(sess.run(None, {"X": x[:n]})[0], x[:n].astype(np.float64) @ wd.T)


def test_packed_all_zero_weight_gives_bias(lib):
    w = np.zeros((6, 300), np.float32)
    b = np.arange(6, dtype=np.float32)
    for p in (packed.encode_int8(w), packed.encode_codebook(w, [1.0], 4), packed.encode_codebook(w, np.ones(256), 8)):
        assert len(p.deltas) == 0
        for isa in ISAS:
            sess = make_session(packed.make_packed_linear_model(p, b), lib, isa=isa)
            for n in (1, 5):
                np.testing.assert_array_equal(sess.run(None, {"X": np.ones((n, 300), np.float32)})[0],
                                              np.broadcast_to(b, (n, 6)))


def test_packed_shapes_and_bias_omitted(lib):
    rng = np.random.default_rng(5)
    w = random_sparse(rng, (7, 40), 0.5)
    p = packed.encode_int8(w)
    model = packed.make_packed_linear_model(p)
    model.graph.node[0].input.append("")  # bias omitted by empty name
    model.graph.input[0].type.tensor_type.shape.ClearField("dim")
    model.graph.output[0].type.tensor_type.shape.ClearField("dim")
    sess = make_session(model, lib)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    assert_close(sess.run(None, {"X": x})[0], x.astype(np.float64) @ packed.decode(p).T)
    assert sess.run(None, {"X": np.zeros((0, 40), np.float32)})[0].shape == (0, 7)
    with pytest.raises(Exception, match="X has 41 features .* in_features is 40"):
        sess.run(None, {"X": np.zeros((2, 41), np.float32)})


def test_isa_paths_differ_and_auto_is_widest(lib):
    """Each ISA path is really taken: the summation orders differ in the last bits."""
    if len(ISAS) < 2:
        pytest.skip("only the portable path on this CPU")
    rng = np.random.default_rng(6)
    w = random_sparse(rng, (300, 3000), 0.3)
    # batch 1 for the packed op; fp32 at batch 16 (the tile product: two AVX2 vectors, one AVX-512 vector per
    # row), since at batch 1 the AVX-512 table reuses AVX2's fp32 SpMV, which measured faster (docs/kernels.md)
    for model, n in ((packed.make_packed_linear_model(packed.encode_int8(w)), 1),
                     (csr.make_sparse_linear_model(w), 16)):
        x = rng.standard_normal((n, 3000)).astype(np.float32)
        out = {isa: make_session(model, lib, isa=isa).run(None, {"X": x})[0] for isa in ISAS}
        for a in ISAS:
            for b in ISAS:
                if a < b:
                    assert not np.array_equal(out[a], out[b]), (a, b)
        np.testing.assert_array_equal(make_session(model, lib).run(None, {"X": x})[0], out[ISAS[-1]])


# ------------------------------------------------------------------------------------------------
# Corrupted files, in a subprocess


def _base_codebook(bits: int = 4) -> packed.PackedCodebook:
    w = np.zeros((5, 600), np.float32)
    w[0, [1, 3, 599]] = [0.5, -1.0, 2.0]  # a filler run in row 0
    w[2, 10:20] = 1.5
    w[4, 300] = -0.5
    return packed.encode_codebook(w, np.array([0.5, -1.0, 2.0, 1.5, -0.5], np.float32), bits)


def _codebook_model(bits: int = 4, **replace) -> onnx.ModelProto:
    model = packed.make_packed_linear_model(_base_codebook(bits), np.ones(5, np.float32), name="cb")
    for name, arr in replace.items():
        _replace(model, f"cb.{name}", arr)
    return model


def _int8_model(**replace) -> onnx.ModelProto:
    w = np.zeros((5, 600), np.float32)
    w[1, [0, 599]] = [1.0, -2.0]
    w[3, 5] = 0.25
    model = packed.make_packed_linear_model(packed.encode_int8(w), None, name="q")
    for name, arr in replace.items():
        _replace(model, f"q.{name}", arr)
    return model


def _replace(model, name, arr):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
            return model
    raise KeyError(name)


def _set_attr(model, name, value):
    attrs = model.graph.node[0].attribute
    names = [a.name for a in attrs]
    if name in names:
        del attrs[names.index(name)]
    if value is not None:
        attrs.append(helper.make_attribute(name, value))
    return model


@functools.lru_cache(maxsize=None)
def _corrupt_cases():
    """name -> (model, input, expected message fragment, extra environment)."""
    c = _base_codebook()
    c8 = _base_codebook(8)
    x = np.ones((2, 600), np.float32)
    assert c.deltas[:5].tolist() == [2, 2, 0, 0, 86]  # row 0: 1, 3, two fillers (to 513), 599
    d_past = c.deltas.copy()
    d_past[4] = 87  # the last entry after the filler run lands on column 600
    codes_bad = c8.codes.copy()
    codes_bad[0] = 200
    r = c.row_ptr
    q8 = _int8_model()
    qd = next(numpy_helper.to_array(t) for t in q8.graph.initializer if t.name == "q.deltas")
    assert qd.tolist() == [1, 0, 0, 89, 6]
    qd_past = qd.copy()
    qd_past[1:3] = 0
    qd_past[3] = 255  # a filler run then a step past column 599
    cases = {
        "cb_valid": (_codebook_model(), x, None, {}),
        "cb8_valid": (_codebook_model(8), x, None, {}),
        "int8_valid": (_int8_model(), x, None, {}),
        "cb_bits_bad": (_set_attr(_codebook_model(), "bits", 3), x, "bits must be 4 or 8", {}),
        "cb_bits_missing": (_set_attr(_codebook_model(), "bits", None), x, "'bits'", {}),
        "cb_in_features": (_set_attr(_codebook_model(), "in_features", 0), x, "in_features must be", {}),
        "cb_too_long": (_codebook_model(codebook=np.ones(17, np.float32)), x, "codebook has 17 entries", {}),
        "cb_nan": (_codebook_model(codebook=np.r_[c.codebook[:-1], np.inf].astype(np.float32)), x, "not finite", {}),
        "cb_empty": (_codebook_model(codebook=np.zeros(0, np.float32)), x, "codebook has 0 entries", {}),
        "cb_codes_len": (_codebook_model(codes=c.codes[:-1]), x, "codes has", {}),
        "cb_code_range": (_codebook_model(codebook=c.codebook[:2]), x, "past the codebook", {}),
        "cb8_code_range": (_codebook_model(8, codes=codes_bad), x, "past the codebook", {}),
        "cb_filler_past_row": (_codebook_model(deltas=d_past), x, "past in_features=600", {}),
        "cb_deltas_len": (_codebook_model(deltas=c.deltas[:-1]), x, "codes has", {}),
        "cb_row_ptr_end": (_codebook_model(row_ptr=np.r_[r[:-1], r[-1] - 1].astype(np.int32)), x,
                           "must equal the number of entries", {}),
        "cb_row_ptr_start": (_codebook_model(row_ptr=np.r_[1, r[1:]].astype(np.int32)), x, "row_ptr[0] must be 0",
                             {}),
        "cb_row_ptr_decreasing": (_codebook_model(row_ptr=np.r_[r[:2], r[1] - 1, r[3:]].astype(np.int32)), x,
                                  "non-decreasing", {}),
        "cb_row_ptr_short": (_codebook_model(row_ptr=np.zeros(1, np.int32)), x, "M+1 >= 2", {}),
        "cb_bias_len": (_codebook_model(bias=np.ones(4, np.float32)), x, "bias must have shape", {}),
        "cb_deltas_dtype": (_codebook_model(deltas=c.deltas.astype(np.int8)), x, "deltas", {}),
        "int8_scales_nan": (_int8_model(scales=np.r_[np.nan, np.ones(4)].astype(np.float32)), x, "scales[0] is not finite",
                            {}),
        "int8_scales_len": (_int8_model(scales=np.ones(4, np.float32)), x, "scales must have shape", {}),
        "int8_values_len": (_int8_model(values=np.zeros(2, np.int8)), x, "values has 2 entries", {}),
        "int8_values_dtype": (_int8_model(values=np.zeros(len(qd), np.uint8)), x, "values", {}),
        "int8_past_row": (_int8_model(deltas=qd_past), x, "past in_features=600", {}),
        "int8_x_features": (_shapeless(_int8_model()), np.ones((2, 599), np.float32), "in_features is 600", {}),
        "isa_unknown": (_int8_model(), x, "not one of auto, avx512, avx2, portable", {"TOOLCHAIN_KERNELS_ISA": "sse9"}),
        "isa_avx512_unsupported": (_int8_model(), x, "TOOLCHAIN_KERNELS_ISA=avx512 but this CPU/OS lacks AVX-512",
                                   {"TOOLCHAIN_KERNELS_ISA": "avx512", "TOOLCHAIN_KERNELS_ISA_CAP": "avx2"}),
        "isa_avx2_unsupported": (_codebook_model(), x, "TOOLCHAIN_KERNELS_ISA=avx2 but this CPU/OS lacks AVX2",
                                 {"TOOLCHAIN_KERNELS_ISA": "avx2", "TOOLCHAIN_KERNELS_ISA_CAP": "portable"}),
    }
    return cases


def _shapeless(model):
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.ClearField("dim")
    return model


def _run_cases(lib_path: str, names: list[str]) -> dict:
    import onnxruntime as ort

    results = {}
    for name in names:
        model, x, _, env = _corrupt_cases()[name]
        os.environ.update({k: v for k, v in env.items() if k != "TOOLCHAIN_KERNELS_ISA_CAP"})
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
    return results


@pytest.fixture(scope="module")
def corrupt_results(lib):
    """One subprocess per TOOLCHAIN_KERNELS_ISA_CAP value (the CPU check runs once per process)."""
    groups: dict[str, list[str]] = {}
    for name, (_, _, _, env) in _corrupt_cases().items():
        groups.setdefault(env.get("TOOLCHAIN_KERNELS_ISA_CAP", ""), []).append(name)
    results = {}
    for cap, names in groups.items():
        env = dict(os.environ)
        env.pop("TOOLCHAIN_KERNELS_ISA", None)
        env.pop("TOOLCHAIN_KERNELS_ISA_CAP", None)
        if cap:
            env["TOOLCHAIN_KERNELS_ISA_CAP"] = cap
        proc = subprocess.run([sys.executable, __file__, "corrupt", str(lib), *names], capture_output=True, text=True,
                              timeout=120, env=env)
        assert proc.returncode == 0, f"subprocess crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
        results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("name", list(_corrupt_cases()))
def test_corrupted_packed_model_gives_clear_error(corrupt_results, name):
    expected = _corrupt_cases()[name][2]
    got = corrupt_results[name]
    if expected is None:
        assert got is None, f"valid model failed: {got}"
        return
    assert got is not None, "no error raised"
    assert expected in got, got
    assert len(got.splitlines()) == 1 and "Traceback" not in got


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "corrupt":
        print(json.dumps(_run_cases(sys.argv[2], sys.argv[3:])))
    else:
        sys.exit(f"usage: {sys.argv[0]} corrupt LIBRARY NAME...")
