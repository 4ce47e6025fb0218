"""Pruned-layer export: compact portable form (stock onnxruntime) and fast form (custom ops)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from converters import import_onnx
from toolchain.methods.prune.sparse_format import decode, encode
from toolchain.cli import main
from toolchain.exporter import export_compressed
from toolchain.methods.prune.layers import masked_from_dense
from toolchain.measure import measure
from toolchain.runtime import make_session


@pytest.mark.parametrize("density", [0.0, 0.0005, 0.01, 0.2, 0.7, 1.0])
def test_encoding_round_trips(density):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((120, 700)).astype(np.float32) * (rng.random((120, 700)) < density)
    enc = encode(w)
    np.testing.assert_array_equal(decode(enc, w.shape), w)
    if density <= 0.2:
        assert enc.nbytes < 6 * max(np.count_nonzero(w), 1) + 8


def pruned_net(path, densities, seed=0):
    net = import_onnx(path).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, d in densities.items():
        layer = masked_from_dense(net.layers()[name])
        layer.prune_(torch.rand(layer.weight.shape, generator=gen) < d)
        net.replace_layer(name, layer)
    return net


def run(model, x):
    sess = make_session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("model,densities", [
    ("lenet300_path", {"ip1": 0.02, "ip2": 0.05, "ip3": 0.5}),
    ("lenet5_path", {"conv1": 0.7, "conv2": 0.1, "ip1": 0.01, "ip2": 0.3}),
])
def test_portable_and_fast_forms_agree_with_torch(model, densities, request, tmp_path):
    path = request.getfixturevalue(model)
    net = pruned_net(path, densities)
    x = np.random.default_rng(0).random((17, 1, 28, 28), dtype=np.float32)
    ref = net(torch.from_numpy(x)).detach().numpy()
    portable = export_compressed(net, tmp_path / "p.onnx", form="portable")
    fast = export_compressed(net, tmp_path / "f.onnx", form="fast")
    onnx.checker.check_model(portable, full_check=True)
    assert not any(n.domain for n in portable.graph.node)  # stock onnxruntime only
    assert any(n.domain == "ai.toolchain" for n in fast.graph.node)
    # stock onnxruntime, no custom library
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    y_p = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    y_f = run(onnx.load(str(tmp_path / "f.onnx")), x)
    np.testing.assert_allclose(y_p, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y_f, y_p, atol=1e-5, rtol=1e-5)
    # really smaller on disk, and the measured non-zeros are the masks'
    nnz = sum(int(m.mask.sum()) for m in net.layers().values())
    nnz_b = sum(int((m.bias != 0).sum()) for m in net.layers().values())
    stats, totals = measure(tmp_path / "p.onnx")
    assert totals["nnz"] == nnz + nnz_b
    assert (tmp_path / "p.onnx").stat().st_size < 7 * nnz + 4 * nnz_b + 20_000
    # both forms import back as pruned layers (every one of them) with the same masks and biases
    from toolchain.methods.prune.layers import _Masked

    for form in ("p", "f"):
        back = import_onnx(tmp_path / f"{form}.onnx").eval()
        for name, layer in net.layers().items():
            got = back.layers()[name]
            assert isinstance(got, _Masked), (form, name, type(got).__name__)
            torch.testing.assert_close(got.weight * (got.weight != 0), layer.masked_weight, atol=0, rtol=0)
            torch.testing.assert_close(got.bias, layer.bias, atol=0, rtol=0)
        np.testing.assert_allclose(back(torch.from_numpy(x)).detach().numpy(), ref, atol=1e-5, rtol=1e-5)


def test_cli_export_converts_a_sparse_model_to_fast_form(tmp_path, lenet300_path, capsys):
    net = pruned_net(lenet300_path, {"ip1": 0.05, "ip2": 0.05})
    export_compressed(net, tmp_path / "p.onnx")
    assert main(["export", str(tmp_path / "p.onnx"), "-o", str(tmp_path / "f.onnx"), "--form", "fast"]) == 0
    ops = {n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node}
    assert "SparseLinear" in ops and "Gemm" in ops  # ip3 (dense) stays a plain Gemm
    x = np.random.default_rng(2).random((3, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(run(onnx.load(str(tmp_path / "f.onnx")), x), run(onnx.load(str(tmp_path / "p.onnx")), x),
                               atol=1e-5, rtol=1e-5)


def test_cli_info_and_bench(tmp_path, lenet300_path, capsys):
    net = pruned_net(lenet300_path, {"ip1": 0.05})
    export_compressed(net, tmp_path / "f.onnx", form="fast")
    assert main(["info", str(tmp_path / "f.onnx"), "--baseline", str(lenet300_path)]) == 0
    out = capsys.readouterr().out
    assert "ai.toolchain.SparseLinear" in out and "fewer non-zero weights" in out
    assert main(["bench", str(tmp_path / "f.onnx"), "--baseline", str(lenet300_path), "--batch", "1,4",
                 "--seconds", "0.05", "--per-layer", "--png", str(tmp_path / "lat.png")]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "bandwidth floor" in out and (tmp_path / "lat.png").exists()
    assert main(["bench", str(tmp_path / "f.onnx"), "--batch", "0"]) == 2
