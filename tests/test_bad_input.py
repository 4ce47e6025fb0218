"""Every input a user can give: one clear error out (exit status 2, one line, no traceback without
--debug), nothing half-written, no unsafe loading -- or a correct result.

One test per class of issue 15, many cases each. Cases that need a command to call a check that
lives in a module (the CLI is being rewritten) are xfail(strict=True, reason="needs CLI wiring: ...")
so they flip to failures -- to be un-marked -- the moment the wiring lands.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import toolchain.driver as driver
from toolchain.cli import main
from toolchain.zoo import MODELS_DIR

LENET300 = MODELS_DIR / "lenet-300-100" / "lenet-300-100.onnx"

PRUNE = """
[[stage]]
pass = "prune"
rounds = ROUNDS
[stage.layers.default]
quality = 1.0
[stage.retrain]
epochs = 0.01
batch_size = 100
"""


def prune_recipe(rounds: int = 1) -> str:
    return PRUNE.replace("ROUNDS", str(rounds))


# ----------------------------------------------------------------------------------------- helpers
def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(argv, capsys, folder: Path | None = None, expect: int = 2, words: str | None = None) -> str:
    """Run the CLI in-process; an uncaught exception (a traceback) fails the test. Returns stderr."""
    before = files(folder) if folder is not None else None
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == expect, f"exit {rc}, expected {expect}\nstdout: {out}\nstderr: {err}"
    if expect == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"toolchain {argv[0]}: error: "), err
        assert "Traceback" not in err
        if words:
            assert any(w.lower() in lines[0].lower() for w in words.split("|")), lines[0]
        if before is not None:
            assert files(folder) == before, f"left behind: {files(folder) - before}"
    return err


def edited(tmp_path: Path, name: str, fn, src: Path = LENET300) -> Path:
    m = onnx.load(str(src))
    fn(m)
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return path


def _set_input_dims(dims):
    def fn(m):
        d = m.graph.input[0].type.tensor_type.shape.dim
        del d[:]
        for v in dims:
            d.add().dim_param = v if isinstance(v, str) else ""
            if not isinstance(v, str):
                d[-1].dim_value = v
    return fn


def _rename_all_nodes(m):
    for n in m.graph.node:
        n.name = "dup"


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def _gemm_bias_names(m):
    return [n.input[2] for n in m.graph.node if n.op_type == "Gemm" and len(n.input) > 2]


def _short_bias(m):
    name = _gemm_bias_names(m)[0]
    t = _init(m, name)
    arr = numpy_helper.to_array(t)[:-3]
    t.CopyFrom(numpy_helper.from_array(arr, name))


def _no_outputs(m):
    del m.graph.output[:]


def _nan_weights(m):
    name = _gemm_bias_names(m)[-1]
    t = _init(m, name)
    t.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(t).shape, np.nan, np.float32), name))


def _fixed_batch(m):
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1


@pytest.fixture()
def ws(tmp_path):
    (tmp_path / "prune.toml").write_text(prune_recipe())
    return tmp_path


def _fast_file_with(tmp_path, mutate) -> Path:
    """A fast-form (SparseLinear) file of a pruned LeNet-300-100 with its first layer's CSR arrays mutated."""
    from converters import import_onnx
    from toolchain.exporter import export_compressed
    from toolchain.methods.prune.layers import masked_from_dense

    net = import_onnx(LENET300)
    for name, layer in list(net.layers().items()):
        masked = masked_from_dense(layer)
        masked.prune_(masked.weight.abs() > masked.weight.abs().median())
        net.replace_layer(name, masked)
    model = export_compressed(net, None, form="fast")
    node = next(n for n in model.graph.node if n.op_type == "SparseLinear")
    arrays = {t.name: t for t in model.graph.initializer}
    values, col, row = (numpy_helper.to_array(arrays[v]).copy() for v in node.input[1:4])
    values, col, row = mutate(values, col.astype(np.int32), row)
    for name, arr in zip(node.input[1:4], (values, col, row)):
        arrays[name].CopyFrom(numpy_helper.from_array(arr, name))
    path = tmp_path / "fast.onnx"
    path.write_bytes(model.SerializeToString())
    return path


# ============================================================== 1. output before the last check
CLASS1 = {
    "duplicate node names": (lambda t: ["compress", edited(t, "m.onnx", _rename_all_nodes), "-r", t / "prune.toml",
                                        "-o", t / "out.onnx", "--no-progress"], "two nodes are named"),
    "input that does not fit the data": (
        lambda t: ["compress", edited(t, "m.onnx", _set_input_dims(["N", 3, 16, 16])), "-r", t / "prune.toml",
                   "-o", t / "out.onnx", "--no-progress"], "does not fit|cannot"),
    "export of a negative sparse index": (
        lambda t: ["export", _fast_file_with(t, lambda v, c, r: (v, np.where(np.arange(len(c)) == 3, -1, c), r)),
                   "-o", t / "out.onnx"], "column index -1"),
    "export of a column index past the end": (
        lambda t: ["export", _fast_file_with(t, lambda v, c, r: (v, np.where(np.arange(len(c)) == 3, 10**6, c), r)),
                   "-o", t / "out.onnx"], "column index 1000000"),
    "export of a decreasing row_ptr": (
        lambda t: ["export", _fast_file_with(t, lambda v, c, r: (v, c, r[::-1].copy())), "-o", t / "out.onnx"],
        "row_ptr"),
    "export of values and indices of different lengths": (
        lambda t: ["export", _fast_file_with(t, lambda v, c, r: (v[:-1], c, r)), "-o", t / "out.onnx"],
        "values but"),
}


@pytest.mark.parametrize("case", list(CLASS1))
def test_1_every_check_runs_before_anything_is_written(ws, capsys, case):
    argv, words = CLASS1[case]
    run_cli(argv(ws), capsys, ws, words=words)


# ============================================================== 2. onnxruntime errors at run time
CLASS2 = {
    "eval of a bias of the wrong length": (
        lambda t: ["eval", edited(t, "m.onnx", _short_bias), "--no-progress", "--limit", "100"], "onnxruntime|bias"),
    "bench of a bias of the wrong length": (
        lambda t: ["bench", edited(t, "m.onnx", _short_bias), "--batch", "2", "--seconds", "0.01"], "onnxruntime"),
    "eval of a graph with no outputs": (
        lambda t: ["eval", edited(t, "m.onnx", _no_outputs), "--no-progress"], "no outputs"),
    "bench of a graph with no outputs": (
        lambda t: ["bench", edited(t, "m.onnx", _no_outputs), "--seconds", "0.01"], "no outputs"),
    "compress of a graph with no outputs": (
        lambda t: ["compress", edited(t, "m.onnx", _no_outputs), "-r", t / "prune.toml", "-o", t / "o.onnx"],
        "no outputs"),
}


@pytest.mark.parametrize("case", list(CLASS2))
def test_2_onnxruntime_failures_are_one_line(ws, capsys, case):
    argv, words = CLASS2[case]
    run_cli(argv(ws), capsys, ws, words=words)


def test_2_runtime_run_wraps_any_onnxruntime_error():
    from toolchain.errors import ModelFormatError
    from toolchain.runtime import make_session, run

    sess = make_session(str(LENET300))
    with pytest.raises(ModelFormatError, match="onnxruntime cannot run the model on data \\[2, 5\\]"):
        run(sess, {"data": np.zeros((2, 5), np.float32)})


def test_2_resolve_batches_uses_a_models_fixed_batch(tmp_path):
    from toolchain.bench import resolve_batches

    fixed = onnx.load(str(edited(tmp_path, "m.onnx", _fixed_batch)))
    assert resolve_batches(fixed, [1, 64])[0] == [1] and "fixed batch size 1" in resolve_batches(fixed, [1, 64])[1]
    assert resolve_batches(fixed, [1]) == ([1], None)
    assert resolve_batches(onnx.load(str(LENET300)), [1, 64]) == ([1, 64], None)


def test_2_bench_times_a_fixed_batch_model_at_its_batch(ws, capsys):
    run_cli(["bench", edited(ws, "m.onnx", _fixed_batch), "--seconds", "0.01"], capsys, expect=0)


# ============================================================== 3. recipe values
BAD_RECIPES = {
    "negative lr": (("lr = 0.01",), "lr = -0.01", "lr must be >= 0, not -0.01"),
    "nan lr": (("lr = 0.01",), "lr = nan", "lr must be a finite number >= 0, not nan"),
    "epochs as a string": (("epochs = 0.01",), 'epochs = "2"', "epochs must be number"),
    "infinite epochs": (("epochs = 0.01",), "epochs = inf", "epochs must be a finite number"),
    "nan quality": (("quality = 1.0",), "quality = nan", "quality must be a finite number"),
    "negative quality": (("quality = 1.0",), "quality = -1.0", "quality must be in [0, 100]"),
    "fractional batch size": (("batch_size = 100",), "batch_size = 2.5", "batch_size must be integer"),
    "zero batch size": (("batch_size = 100",), "batch_size = 0", "batch_size must be in [1,"),
    "list for a number": (("quality = 1.0",), "quality = [1.0]", "quality must be number"),
    "list for rounds": (("rounds = 1",), "rounds = [1]", "rounds must be integer"),
    "bool for rounds": (("rounds = 1",), "rounds = true", "rounds must be integer"),
    "zero rounds": (("rounds = 1",), "rounds = 0", "rounds must be in [1, 1000]"),
    "unknown schedule": (("rounds = 1",), 'rounds = 1\nschedule = "cubic"', "schedule must be one of"),
    "density zero": (("quality = 1.0",), "density = 0.0", "density must be in (0, 1]"),
    "momentum 1.5": (("lr = 0.01",), "momentum = 1.5", "momentum must be in [0, 1)"),
    "unknown retrain key": (("lr = 0.01",), "learning_rate = 0.1", "unknown key 'learning_rate'"),
    "negative seed": (("[[stage]]",), "seed = -1\n[[stage]]", "seed must be in [0, 2^32)"),
    "seed as a float": (("[[stage]]",), "seed = 1.5\n[[stage]]", "seed must be integer"),
    "unknown dataset": (("[[stage]]",), 'dataset = "cifar"\n[[stage]]', "dataset must be one of"),
    "only both": (("rounds = 1",), 'rounds = 1\nonly = "both"', "only must be one of"),
    "pass as a number": (('pass = "prune"',), "pass = 3", "pass must be a string"),
    "unknown pass": (('pass = "prune"',), 'pass = "distill"', "unknown pass 'distill'"),
    "retrain not a table": (("rounds = 1", "[stage.retrain]\nepochs = 0.01\nbatch_size = 100\nlr = 0.01"),
                            "rounds = 1\nretrain = 3", "must be a table"),
    "lr_policy unknown": (("lr = 0.01",), 'lr_policy = "warmup"', "lr_policy must be one of"),
    "huge shift": (("lr = 0.01",), "augment_shift = 1000", "augment_shift must be in [0, 64]"),
}


def _recipe_with(old: tuple, new: str) -> str:
    text = prune_recipe().replace("batch_size = 100", "batch_size = 100\nlr = 0.01")
    for o in old:
        assert o in text, o
        text = text.replace(o, new, 1)
        new = ""
    return text


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_3_recipe_values_are_checked_before_training(ws, capsys, monkeypatch, case):
    old, new, words = BAD_RECIPES[case]
    (ws / "bad.toml").write_text(_recipe_with(old, new))
    monkeypatch.setattr(driver, "train", lambda *a, **k: pytest.fail("trained with a bad recipe"))
    err = run_cli(["compress", LENET300, "-r", ws / "bad.toml", "-o", ws / "out.onnx", "--no-progress"], capsys, ws)
    assert words in err, err


def test_3_a_recipe_that_is_not_utf8(ws, capsys):
    (ws / "bad.toml").write_bytes(prune_recipe().encode("utf-16"))
    run_cli(["compress", LENET300, "-r", ws / "bad.toml", "-o", ws / "out.onnx"], capsys, ws, words="not UTF-8")


def test_3_a_recipe_that_is_a_folder(ws, capsys):
    (ws / "dir.toml").mkdir()
    run_cli(["compress", LENET300, "-r", ws / "dir.toml", "-o", ws / "out.onnx"], capsys, ws, words="is a directory")


@pytest.mark.parametrize("line, words", [('epochs = "2"', "epochs must be number"), ("lr = -1.0", "lr must be >= 0"),
                                         ("batch_size = 0.5", "batch_size must be integer")])
def test_3_train_config_values(ws, capsys, line, words):
    (ws / "train.toml").write_text(line + "\n")
    run_cli(["train", "lenet-300-100", "--config", ws / "train.toml", "-o", ws / "m.onnx", "--no-progress"],
            capsys, ws, words=words)


def test_3_train_config_not_utf8(ws, capsys):
    (ws / "train.toml").write_bytes("epochs = 1 # \xe9\n".encode("latin-1"))
    run_cli(["train", "lenet-300-100", "--config", ws / "train.toml", "-o", ws / "m.onnx"], capsys, ws,
            words="not UTF-8")


# ============================================================== 4 + 5. resume: mismatch, unsafe, corrupt
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A real `toolchain compress` run killed during its second round: the folder with its checkpoint."""
    folder = tmp_path_factory.mktemp("interrupted")
    (folder / "r.toml").write_text(prune_recipe(rounds=2))
    real, calls = driver.train, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    driver.train = flaky
    try:
        rc = main(["compress", str(LENET300), "-r", str(folder / "r.toml"), "-o", str(folder / "out.onnx"),
                   "--no-progress", "--threads", "1"])
    finally:
        driver.train = real
    assert rc == 130 and (folder / "out.onnx.ckpt").exists() and not (folder / "out.onnx").exists()
    return folder


def _copy(interrupted, tmp_path):
    for p in interrupted.iterdir():
        shutil.copy(p, tmp_path / p.name)
    return tmp_path


CLASS4 = {
    "changed recipe": (lambda t: (t / "r.toml").write_text(prune_recipe(2).replace("quality = 1.0", "quality = 1.1")),
                       LENET300, "the recipe changed"),
    "changed model": (lambda t: None, "other", "starting weights changed"),
}


@pytest.mark.parametrize("case", list(CLASS4))
def test_4_resume_refuses_a_changed_recipe_or_model(interrupted, tmp_path, capsys, monkeypatch, case):
    t = _copy(interrupted, tmp_path)
    change, model, words = CLASS4[case]
    change(t)
    if model == "other":
        model = edited(t, "other.onnx", lambda m: _init(m, _gemm_bias_names(m)[0]).float_data.extend([]) or
                       _init(m, _gemm_bias_names(m)[0]).CopyFrom(numpy_helper.from_array(
                           numpy_helper.to_array(_init(m, _gemm_bias_names(m)[0])) + 1, _gemm_bias_names(m)[0])))
    monkeypatch.setattr(driver, "train", lambda *a, **k: pytest.fail("trained on a mismatched resume"))
    run_cli(["compress", model, "-r", t / "r.toml", "-o", t / "out.onnx", "--resume", "--no-progress"], capsys, t,
            words=words)


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))


CLASS5 = {
    "pickled object in a compress checkpoint": ("compress", lambda p: torch.save({"net": _Boom()}, p)),
    "plain pickle in a compress checkpoint": ("compress", lambda p: p.write_bytes(pickle.dumps({"net": 1}))),
    "truncated compress checkpoint": ("compress", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "garbage compress checkpoint": ("compress", lambda p: p.write_bytes(b"\x00garbage" * 100)),
    "empty compress checkpoint": ("compress", lambda p: p.write_bytes(b"")),
    "pickled object in a train checkpoint": ("train", lambda p: torch.save({"model": _Boom()}, p)),
    "garbage train checkpoint": ("train", lambda p: p.write_bytes(b"PK\x03\x04" + b"x" * 100)),
}


@pytest.mark.parametrize("case", list(CLASS5))
def test_5_checkpoints_are_never_unpickled(interrupted, tmp_path, capsys, monkeypatch, case):
    t = _copy(interrupted, tmp_path)
    cmd, make = CLASS5[case]
    monkeypatch.chdir(t)
    if cmd == "compress":
        make(t / "out.onnx.ckpt")
        argv = ["compress", LENET300, "-r", t / "r.toml", "-o", t / "out.onnx", "--resume", "--no-progress"]
    else:
        make(t / "m.onnx.ckpt")
        (t / "train.toml").write_text("epochs = 0.01\nbatch_size = 100\n")
        argv = ["train", "lenet-300-100", "--config", t / "train.toml", "-o", t / "m.onnx", "--resume", "--no-progress"]
    run_cli(argv, capsys, t, words="cannot be loaded safely|not a toolchain checkpoint|not a toolchain-checkpoint")
    assert not (t / "PWNED").exists()


# ============================================================== 6. one sparse format, one semantics
def _csr(seed=0, shape=(5, 9), density=0.4):
    from toolchain.methods.prune.csr import dense_to_csr

    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * (rng.random(shape) < density)
    return w, dense_to_csr(w)


CSR_BAD = {
    "negative column": (lambda v, c, r: (v, np.where(np.arange(len(c)) == 0, -1, c.astype(np.int64)), r), "column index -1"),
    "column past the end": (lambda v, c, r: (v, np.where(np.arange(len(c)) == 0, 9, c.astype(np.int64)), r), "column index 9"),
    "row_ptr not from 0": (lambda v, c, r: (v, c, r + 1), "row_ptr"),
    "row_ptr decreasing": (lambda v, c, r: (v, c, r[::-1].copy()), "row_ptr"),
    "short values": (lambda v, c, r: (v[:-1], c, r), "values but"),
    "float indices": (lambda v, c, r: (v, c.astype(np.float32), r), "integer"),
    "2-D values": (lambda v, c, r: (v.reshape(1, -1), c, r), "1-D"),
}


@pytest.mark.parametrize("case", list(CSR_BAD))
@pytest.mark.parametrize("reader", ["validate_csr", "csr_to_dense", "sparse_linear_reference"])
def test_6_every_python_reader_of_the_csr_format_refuses_bad_arrays(case, reader):
    from toolchain.errors import ModelFormatError
    from toolchain.methods.prune.csr import csr_to_dense
    from toolchain.methods.prune import sparse_format

    _, arrays = _csr()
    mutate, words = CSR_BAD[case]
    bad = mutate(*arrays)
    fn = {"validate_csr": lambda: sparse_format.validate_csr(*bad, 9), "csr_to_dense": lambda: csr_to_dense(*bad, 9),
          "sparse_linear_reference": lambda: sparse_format.sparse_linear_reference(np.ones((2, 9), np.float32), *bad, 9)}
    with pytest.raises(ModelFormatError, match=words):
        fn[reader]()


@pytest.mark.parametrize("case, words", [("negative position", "position -1"), ("position past the end", "outside"),
                                         ("zero gap", "gap 0"), ("repeated position", "strictly increasing")])
def test_6_the_portable_encoding_is_validated(case, words):
    from toolchain.errors import ModelFormatError
    from toolchain.methods.prune.sparse_format import EncodedSparse, decode, encode

    w = np.zeros((4, 5), np.float32)
    w[1, 2], w[3, 4] = 1.5, -2.0
    assert np.array_equal(decode(encode(w), w.shape), w)
    enc = {"negative position": EncodedSparse(np.ones(2, np.float32), np.array([-1, 3], np.int32), "positions", 20),
           "position past the end": EncodedSparse(np.ones(2, np.float32), np.array([3, 20], np.int32), "positions", 20),
           "zero gap": EncodedSparse(np.ones(2, np.float32), np.array([2, 0], np.uint8), "gaps", 20),
           "repeated position": EncodedSparse(np.ones(2, np.float32), np.array([3, 3], np.int32), "positions", 20)}[case]
    with pytest.raises(ModelFormatError, match=words):
        decode(enc, (4, 5))


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_6_sparse_semantics_equal_the_dense_gemm_for_nan_and_inf(special):
    from toolchain.methods.prune.sparse_format import sparse_linear_reference

    w, arrays = _csr(seed=1, shape=(6, 11))
    x = np.random.default_rng(2).standard_normal((4, 11)).astype(np.float32)
    x[0, 3] = special
    x[2, 7] = special
    with np.errstate(invalid="ignore"):
        dense = x @ w.T
    got = sparse_linear_reference(x, *arrays, 11)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(dense))
    finite = np.isfinite(dense)
    np.testing.assert_allclose(got[finite], dense[finite], rtol=1e-5, atol=1e-5)
    assert np.isnan(got[0]).sum() >= 1  # a pruned weight times NaN/inf is NaN, as in the dense layer


def _kernels_built() -> bool:
    from toolchain import kernels

    try:
        return Path(kernels.library_path()).exists()
    except Exception:
        return False


@pytest.mark.skipif(not _kernels_built(), reason="custom-op library not built (python -m toolchain.kernels.build)")
def test_6_fast_form_matches_dense_on_nan_inputs():
    from toolchain.methods.prune.csr import make_sparse_linear_model
    from toolchain.runtime import make_session, run

    w, _ = _csr(seed=1, shape=(6, 11))
    x = np.random.default_rng(2).standard_normal((4, 11)).astype(np.float32)
    x[0, 3] = np.nan
    sess = make_session(make_sparse_linear_model(w))
    got = run(sess, {sess.get_inputs()[0].name: x})[0]
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(x @ w.T))


def test_6_uint16_column_indices_are_refused_past_65536_columns():
    from toolchain.errors import ModelFormatError
    from toolchain.methods.prune.csr import dense_to_csr

    wide = np.zeros((1, 65537), np.float32)
    wide[0, -1] = 1.0
    assert dense_to_csr(wide)[1].dtype == np.int32
    assert dense_to_csr(wide[:, :65536])[1].dtype == np.uint16
    with pytest.raises(ModelFormatError, match="uint16 column indices cannot address 65537"):
        dense_to_csr(wide, index_dtype=np.uint16)


# ============================================================== 7. paths and resources
def _unwritable(t):
    d = t / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d / "out.onnx"


def _parent_is_file(t):
    (t / "afile").write_text("x")
    return t / "afile" / "out.onnx"


def _is_dir(t):
    (t / "adir").mkdir()
    return t / "adir"


OUTPUTS = {"a folder that cannot be written": _unwritable, "a parent that is a file": _parent_is_file,
           "an output that is a directory": _is_dir}


@pytest.mark.parametrize("case", list(OUTPUTS))
def test_7_check_writable(tmp_path, case):
    from converters.fileio import check_writable
    from toolchain.errors import ToolchainError

    if case == "a folder that cannot be written" and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    with pytest.raises(ToolchainError):
        check_writable(OUTPUTS[case](tmp_path))
    assert check_writable(tmp_path / "new" / "deeper" / "out.onnx")  # creatable: fine, and nothing created
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("case", list(OUTPUTS))
@pytest.mark.parametrize("command", ["compress", "export"])
def test_7_outputs_that_cannot_be_written_fail_before_work(ws, capsys, monkeypatch, case, command):
    if case == "a folder that cannot be written" and os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    out = OUTPUTS[case](ws)
    monkeypatch.setattr(driver, "train", lambda *a, **k: pytest.fail("trained before checking the output"))
    argv = (["compress", LENET300, "-r", ws / "prune.toml", "-o", out, "--no-progress"] if command == "compress"
            else ["export", LENET300, "-o", out])
    run_cli(argv, capsys, ws)


@pytest.mark.parametrize("dims", [["N", 2**31], ["N", 2**40], ["N", 1, 2**16, 2**16], [-5, 784], ["N", -1]])
@pytest.mark.parametrize("command", ["compress", "bench", "eval"])
def test_7_huge_or_negative_declared_dimensions(ws, capsys, dims, command):
    if command != "compress" and min(d for d in dims if isinstance(d, int)) < 0:
        pytest.skip("onnxruntime treats a negative dimension as dynamic: bench / eval give a correct result")
    model = edited(ws, "m.onnx", _set_input_dims(dims))
    argv = {"compress": ["compress", model, "-r", ws / "prune.toml", "-o", ws / "out.onnx", "--no-progress"],
            "bench": ["bench", model, "--seconds", "0.01"],
            "eval": ["eval", model, "--no-progress", "--limit", "10"]}[command]
    run_cli(argv, capsys, ws, words="per sample|negative|GiB|invalid|does not fit|dimension")


@pytest.mark.parametrize("threads", ["100000", "0", "-3", "9999"])
def test_7_thread_counts(ws, capsys, threads):
    run_cli(["bench", LENET300, "--threads", threads, "--seconds", "0.01"], capsys, ws, words="thread")


# ============================================================== 8. real models
def _mlp_file(tmp_path) -> Path:
    from converters import torch_to_onnx

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    path = tmp_path / "mlp.onnx"
    torch_to_onnx(mlp.eval(), torch.zeros(1, 784), path)
    return path


def test_8_flat_input_mlp_compresses_and_its_sensitivity_runs(ws, capsys):
    mlp = _mlp_file(ws)
    run_cli(["compress", mlp, "-r", ws / "prune.toml", "-o", ws / "out.onnx", "--no-progress", "--threads", "1"],
            capsys, expect=0)
    assert (ws / "out.onnx").exists() and not (ws / "out.onnx.ckpt").exists()
    run_cli(["sensitivity", mlp, "--densities", "1,0.5", "-o", ws / "s.png", "--no-progress"], capsys, expect=0)


@pytest.mark.parametrize("model", ["shufflenet", "inception_v2"])
def test_8_dynamic_batch_of_model_zoo_graphs(model):
    from converters import import_onnx

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / f"light_{model}.onnx"
    if not path.exists():
        pytest.skip("the onnx wheel ships no light model-zoo graphs")
    net = import_onnx(path)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        both = net(x)
        one = net(x[1:2])
    assert both.shape[0] == 3
    torch.testing.assert_close(both[1:2], one, rtol=1e-4, atol=1e-5)


def test_8_a_matmul_weight_input_keeps_its_first_dimension():
    from converters import import_onnx

    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 784]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [784, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    net = import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert net.input_shapes == {"x": ["N", 784], "w": [784, 10]}
    assert net(torch.ones(5, 784), torch.ones(784, 10)).shape == (5, 10)


def test_8_a_graph_without_weights_exports(ws, capsys):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 784])])
    src = ws / "relu.onnx"
    src.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    run_cli(["export", src, "-o", ws / "out.onnx"], capsys, expect=0)
    from toolchain.runtime import make_session, run

    sess = make_session(str(ws / "out.onnx"))
    x = np.array([[-1.0, 2.0] * 392], np.float32)
    np.testing.assert_array_equal(run(sess, {"x": x})[0], np.maximum(x, 0))


@pytest.mark.parametrize("mean, std, words", [([0.1307], [0.0], "std > 0"), ([0.1, 0.2], [1.0], "2 values"),
                                              ([float("nan")], [1.0], "finite")])
def test_8_normalize_checks_its_arguments(mean, std, words):
    from toolchain.accuracy import normalize
    from toolchain.errors import DataError

    x = np.ones((2, 1, 4, 4), np.float32)
    with pytest.raises(DataError, match=words):
        normalize(x, mean, std)


def test_8_normalize_per_channel():
    from toolchain.accuracy import normalize

    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    y = normalize(x, [1.0, 2.0, 3.0], [2.0, 4.0, 8.0])
    assert np.allclose(y[:, 1], (x[:, 1] - 2.0) / 4.0) and y.dtype == np.float32


def test_8_eval_with_mean_and_std(ws, capsys):
    run_cli(["eval", LENET300, "--mean", "0.1307", "--std", "0.3081", "--limit", "100", "--no-progress"],
            capsys, expect=0)


@pytest.mark.parametrize("argv, words", [
    (["--mean", "0.1307"], "together"), (["--mean", "0.1", "--std", "0"], "std > 0"),
    (["--mean", "x", "--std", "1"], "comma-separated"), (["--mean", "0.1", "--std", "nan"], "finite"),
])
def test_8_compress_and_sensitivity_check_mean_and_std(ws, capsys, argv, words):
    run_cli(["compress", LENET300, "-r", ws / "prune.toml", "-o", ws / "out.onnx", "--no-progress", *argv],
            capsys, ws, words=words)
    run_cli(["sensitivity", LENET300, "-o", ws / "s.png", "--no-progress", *argv], capsys, ws, words=words)


def test_8_compress_normalises_every_sample(ws, capsys):
    """--mean / --std reach training, validation and the test error; the model sees (x - mean) / std."""
    import torch
    import toolchain

    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    model.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
    rng = np.random.default_rng(0)
    x = (5.0 + 2.0 * rng.standard_normal((64, 3, 2, 2))).astype(np.float32)
    x[:, 1] += 10.0  # channel 1 has its own mean
    y = rng.integers(0, 3, 64)
    recipe = toolchain.Recipe.from_dict({"stage": [{"pass": "prune", "rounds": 1, "layers": {"default": {"quality": 0.5}},
                                                    "retrain": {"epochs": 1, "batch_size": 16}}]})
    toolchain.compress(model, recipe, (x, y), mean=[5.0, 15.0, 5.0], std=2.0, progress=False)
    fed = torch.cat([t.reshape(len(t), 3, 2, 2) for t in seen if len(t) > 2])
    assert abs(float(fed.mean())) < 0.3 and abs(float(fed[:, 1].mean())) < 0.3 and 0.7 < float(fed.std()) < 1.3
    with pytest.raises(toolchain.DataError, match="together"):
        toolchain.compress(model, recipe, (x, y), mean=5.0, progress=False)


def test_8_compress_cli_with_mean_and_std(ws, capsys):
    out_file = ws / "out.onnx"
    run_cli(["compress", LENET300, "-r", ws / "prune.toml", "-o", out_file, "--no-retrain", "--no-progress",
             "--mean", "0.1307", "--std", "0.3081"], capsys, expect=0)
    assert out_file.exists()


CAFFE_NET = """
name: "acts"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "act" type: "TYPE" bottom: "data" top: "act" PARAM }
"""


@pytest.mark.parametrize("kind, param, ref", [
    ("Sigmoid", "", lambda x, s: 1 / (1 + np.exp(-x))),
    ("TanH", "", lambda x, s: np.tanh(x)),
    ("PReLU", "", lambda x, s: np.where(x > 0, x, 0.25 * x)),
    ("PReLU", "prelu_param { channel_shared: true filler { type: \"constant\" value: 0.1 } }",
     lambda x, s: np.where(x > 0, x, 0.1 * x)),
    ("PReLU", "prelu_param { filler { type: \"uniform\" min: 0.1 max: 0.9 } }", "per-channel"),
])
def test_8_caffe_activations(tmp_path, kind, param, ref):
    from converters import import_onnx
    from converters.caffe import convert_caffe
    from toolchain.runtime import make_session, run

    proto = tmp_path / "net.prototxt"
    proto.write_text(CAFFE_NET.replace("TYPE", kind).replace("PARAM", param))
    result = convert_caffe(proto, seed=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    sess = make_session(result.model)
    got = run(sess, {"data": x})[0]
    if ref == "per-channel":
        slope = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "act.slope"))
        assert slope.shape == (3, 1, 1) and len(np.unique(slope)) == 3
        want = np.where(x > 0, x, slope * x)
    else:
        want = ref(x, None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # and the ONNX file imports into a trainable network computing the same
        np.testing.assert_allclose(import_onnx(result.model)(torch.from_numpy(x)).numpy(), want, rtol=1e-5, atol=1e-6)


def test_8_caffe_net_whose_data_layers_are_all_excluded_by_stage_rules(tmp_path):
    from converters.caffe import convert_caffe
    from toolchain.errors import ModelFormatError

    proto = tmp_path / "net.prototxt"
    proto.write_text("""
name: "staged"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST stage: "val" } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
""")
    with pytest.raises(ModelFormatError, match="every data layer is excluded.*'data'.*stage: \"val\""):
        convert_caffe(proto, input_shape=(1, 4, 4))


def test_8_caffe_layers_come_from_one_registry():
    from converters.caffe import to_onnx
    from converters.registry import Registry, RegistryError

    assert isinstance(to_onnx.CAFFE_LAYERS, Registry) and to_onnx.CAFFE_LAYERS.kind == "caffe layer"
    assert {"Convolution", "InnerProduct", "Sigmoid", "TanH", "PReLU"} <= set(to_onnx.CAFFE_LAYERS)
    assert not any(name.startswith("_") and callable(getattr(to_onnx._Converter, name))
                   and name[1:] in {k.lower() for k in to_onnx.CAFFE_LAYERS} for name in dir(to_onnx._Converter))
    with pytest.raises(RegistryError):
        to_onnx.CAFFE_LAYERS.add("Sigmoid", lambda *a: None)


# ============================================================== 9. silent nonsense
def test_9_eval_of_a_model_with_nan_outputs(ws, capsys):
    run_cli(["eval", edited(ws, "m.onnx", _nan_weights), "--no-progress", "--limit", "200"], capsys, ws,
            words="not finite")


def test_9_score_refuses_nonfinite_outputs():
    from toolchain.accuracy import _score
    from toolchain.errors import DataError

    y = np.array([0, 1])
    assert _score(np.array([[2.0, 1.0], [0.0, 3.0]]), y).error == 0.0
    for bad in (np.nan, np.inf):
        with pytest.raises(DataError, match="not finite"):
            _score(np.array([[bad, 1.0], [0.0, 3.0]]), y)
