"""The SGD trainer's safety settings: gradient clipping and stopping on divergence."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from toolchain.cli import main
from toolchain.errors import TrainingDiverged
from toolchain.recipe import parse_recipe
from toolchain.train import TrainConfig, train


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32) * 50, rng.integers(0, 10, n)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


@pytest.mark.parametrize("clip", [0.5, 2.0])
def test_clip_grad_norm_limits_one_step(clip):
    x, y = _data()
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0, lr_policy="fixed",
                      clip_grad_norm=clip)
    train(net, x, y, cfg, progress=False)  # one step: the update is -lr * clipped gradient
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), before)])
    assert step.norm().item() == pytest.approx(clip, rel=1e-4)  # inputs x50: the raw gradient is far larger

    unclipped = _net()
    train(unclipped, x, y, TrainConfig(**{**cfg.__dict__, "clip_grad_norm": 0.0}), progress=False)
    raw = torch.cat([(p.detach() - b).flatten() for p, b in zip(unclipped.parameters(), before)])
    assert raw.norm().item() > 10 * clip
    assert torch.allclose(step / step.norm(), raw / raw.norm(), atol=1e-5)  # same direction, shorter


def test_divergence_stops_with_clear_error():
    x, y = _data(256)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+ of 8 .*lower lr or set clip_grad_norm"):
        train(_net(), x, y, TrainConfig(epochs=2, batch_size=64, lr=1e37, weight_decay=0.0), desc="t",
              progress=False)


def test_clip_grad_norm_recipe_key_is_validated():
    base = '[[stage]]\npass = "prune"\n[stage.layers.default]\nquality = 1.0\n[stage.retrain]\n'
    assert parse_recipe(base + "clip_grad_norm = 5.0\n").stages[0].retrain.clip_grad_norm == 5.0
    with pytest.raises(Exception, match="clip_grad_norm must be >= 0"):
        parse_recipe(base + "clip_grad_norm = -1.0\n")


def test_cli_compress_reports_divergence_and_writes_nothing(tmp_path, lenet300_path, mnist, capsys, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[stage]]\npass = "prune"\n[stage.layers.default]\nquality = 0.5\n'
                      "[stage.retrain]\nepochs = 0.02\nlr = 1e37\n")
    out = tmp_path / "o.onnx"
    assert main(["compress", str(lenet300_path), "-r", str(recipe), "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged at step" in err[0]
    assert not out.exists()
