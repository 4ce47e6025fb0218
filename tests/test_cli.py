"""Command-line behaviour on good and bad input: one-line errors, exit status 2, no partial files."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolchain.cli import main


def _mlp(in_shape, path):
    w = numpy_helper.from_array(np.zeros((10, int(np.prod(in_shape))), np.float32), "fc.weight")
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "fc.weight"], ["y"], name="fc", transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def _one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for f in fragments:
        assert f in err[0]


def test_eval_prints_the_shipped_error(lenet5_path, capsys):
    from toolchain import file_metadata

    recorded = 100 * float(file_metadata(lenet5_path)["ai.toolchain.test_error"])  # the card's figure
    assert main(["eval", str(lenet5_path), "--no-progress"]) == 0
    assert f"test error {recorded:.2f}%" in capsys.readouterr().out


def test_flat_input_models_are_fed_flattened_images(tmp_path, capsys):
    assert main(["eval", str(_mlp([784], tmp_path / "flat.onnx")), "--no-progress", "--limit", "100"]) == 0


def test_input_shape_that_does_not_fit_mnist(tmp_path, capsys):
    assert main(["eval", str(_mlp([3, 32, 32], tmp_path / "rgb.onnx")), "--dataset", "mnist"]) == 2
    _one_line_error(capsys, "does not fit MNIST")


@pytest.mark.parametrize("cmd", ["eval", "info"])
def test_truncated_and_non_onnx_files(tmp_path, lenet300_path, capsys, cmd):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(lenet300_path.read_bytes()[:5000])
    assert main([cmd, str(bad)]) == 2
    _one_line_error(capsys, "bad.onnx")
    bad.write_text("hello, not a model\n" * 50)
    assert main([cmd, str(bad)]) == 2
    _one_line_error(capsys, "not an ONNX model")


def test_failed_export_leaves_no_output(tmp_path, lenet300_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    out = tmp_path / "out.onnx"
    assert main(["export", str(bad), "-o", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".out.onnx*"))


def test_zoo_lists_models(capsys):
    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "lenet-300-100" in out and "alexnet" in out
