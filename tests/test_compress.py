"""The compression driver: end-to-end run, checkpoints and --resume."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

import toolchain.driver as compress_mod
from converters import import_onnx
from toolchain.cli import main
from toolchain.driver import compress_network
from toolchain.recipe import parse_recipe

RECIPE = """
seed = 7
[[stage]]
pass = "prune"
rounds = 3
[stage.layers.default]
quality = 0.8
[stage.retrain]
epochs = 0.25
batch_size = 100
lr = 0.01
"""


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, lenet300_path, mnist_small, monkeypatch):
    recipe = parse_recipe(RECIPE)
    full = compress_network(import_onnx(lenet300_path), recipe, mnist_small, progress=False).net

    ckpt = tmp_path / "run.ckpt"
    real_train = compress_mod.train
    calls = {"n": 0}

    def flaky_train(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during round 2's retraining
        return real_train(*a, **k)

    monkeypatch.setattr(compress_mod, "train", flaky_train)
    with pytest.raises(KeyboardInterrupt):
        compress_network(import_onnx(lenet300_path), recipe, mnist_small, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(compress_mod, "train", real_train)
    assert ckpt.exists()
    resumed = compress_network(import_onnx(lenet300_path), recipe, mnist_small, checkpoint=ckpt, resume=True,
                               progress=False).net
    for (n1, t1), (n2, t2) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_cli_compress_writes_portable_sparse_onnx(tmp_path, lenet300_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace("epochs = 0.25", "epochs = 0.05").replace("rounds = 3", "rounds = 1"))
    out = tmp_path / "pruned.onnx"
    assert main(["compress", str(lenet300_path), "-r", str(recipe), "-o", str(out), "--no-progress",
                 "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "| ip1 |" in text and "test error:" in text
    assert out.stat().st_size < lenet300_path.stat().st_size / 2
    assert (tmp_path / "plots" / "sparsity-ip1.png").exists()
    assert not (tmp_path / "pruned.onnx.ckpt").exists()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # stock onnxruntime
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert y.shape == (2, 10)


def test_cli_bad_recipe_fails_before_training(tmp_path, lenet300_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace("[stage.layers.default]", "[stage.layers.conv7]"))
    out = tmp_path / "o.onnx"
    assert main(["compress", str(lenet300_path), "-r", str(recipe), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "conv7" in err[0]
    assert not out.exists()
