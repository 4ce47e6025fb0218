"""Compression checkpoints: tensors + plain data only (no pickled objects), exact resume through every
method (prune with dead-unit removal, hashed with its teacher, low-rank), refused on mismatch."""
import pickle

import pytest
import torch

import toolchain.driver as driver
from converters import import_onnx
from toolchain.checkpoint import CheckpointError, load_checkpoint
from toolchain.driver import compress_network
from toolchain.recipe import parse_recipe

MULTI = """
seed = 3
[[stage]]
pass = "prune"
rounds = 2
[stage.layers.default]
quality = 1.2
[stage.retrain]
epochs = 0.1
batch_size = 100
[[stage]]
pass = "hashed"
[stage.layers.ip2]
compression = 0.25
init = "dense"
[stage.retrain]
epochs = 0.1
batch_size = 100
distill_temperature = 2.0
distill_weight = 0.5
[[stage]]
pass = "lowrank"
[stage.layers.ip1]
rank = 20
[stage.retrain]
epochs = 0.1
batch_size = 100
"""


def _data(mnist_small):
    x, y, tx, ty = mnist_small
    return x[:600], y[:600], tx[:200], ty[:200]


def test_resume_through_every_method_is_exact(tmp_path, lenet300_path, mnist_small, monkeypatch):
    recipe, data = parse_recipe(MULTI), _data(mnist_small)
    full = compress_network(import_onnx(lenet300_path), recipe, data, progress=False).net
    ckpt = tmp_path / "run.ckpt"
    real = driver.train
    for stop_at, resume in ((3, False), (2, True)):  # interrupted in the hashed stage (its teacher saved), then in the low-rank stage
        calls = {"n": 0}

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(driver, "train", flaky)
        with pytest.raises(KeyboardInterrupt):
            compress_network(import_onnx(lenet300_path), recipe, data, checkpoint=ckpt, resume=resume,
                             progress=False)
        monkeypatch.setattr(driver, "train", real)
    state = torch.load(ckpt, weights_only=True)  # loads with the safe unpickler: plain data only
    assert state["passes"][1]["teacher"]["__network__"]["nodes"]
    resumed = compress_network(import_onnx(lenet300_path), recipe, data, checkpoint=ckpt, resume=True,
                               progress=False).net
    assert [type(m).__name__ for m in resumed.layers().values()] == [type(m).__name__ for m in full.layers().values()]
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def _stop_after_first_round(monkeypatch):
    def stop(*a, **k):
        raise KeyboardInterrupt

    calls = {"n": 0}
    real = driver.train

    def flaky(*a, **k):
        calls["n"] += 1
        return stop() if calls["n"] == 2 else real(*a, **k)

    monkeypatch.setattr(driver, "train", flaky)
    return real


SMALL = MULTI.split("[[stage]]\npass = \"hashed\"")[0]


@pytest.mark.parametrize("change", ["recipe", "model", "data"])
def test_resume_refuses_a_changed_recipe_model_or_data(tmp_path, lenet300_path, mnist_small, monkeypatch, change):
    recipe, data = parse_recipe(SMALL), _data(mnist_small)
    ckpt = tmp_path / "run.ckpt"
    real = _stop_after_first_round(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        compress_network(import_onnx(lenet300_path), recipe, data, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(driver, "train", real)
    net = import_onnx(lenet300_path)
    if change == "recipe":
        recipe = parse_recipe(SMALL.replace("quality = 1.2", "quality = 1.3"))
    elif change == "model":
        with torch.no_grad():
            net.layers()["ip1"].weight[0, 0] += 1
    else:
        x, y, tx, ty = data
        data = (x[::-1].copy(), y[::-1].copy(), tx, ty)
    with pytest.raises(CheckpointError, match=f"cannot resume.*{ {'recipe': 'recipe', 'model': 'weights', 'data': 'data'}[change] }"):
        compress_network(net, recipe, data, checkpoint=ckpt, resume=True, progress=False)


def test_a_pickled_object_checkpoint_is_refused_not_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))

    path = tmp_path / "evil.ckpt"
    torch.save({"net": Boom()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04garbage" * 10])
def test_a_corrupt_checkpoint_is_one_error(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_module_records_only_build_allowed_classes():
    from toolchain.checkpoint import restore_module

    rec = {"class": "os.system", "attrs": {}, "params": {}, "buffers": {}, "children": {}}
    with pytest.raises(CheckpointError, match="not one the toolchain creates"):
        restore_module(rec, {}, None)
    rec["class"] = "toolchain.checkpoint.load_checkpoint"
    with pytest.raises(CheckpointError, match="not a module class"):
        restore_module(rec, {}, None)


def test_training_checkpoint_is_loaded_safely(tmp_path):
    import numpy as np

    from toolchain.train import TrainConfig, train

    x = np.random.default_rng(0).random((64, 4), dtype=np.float32)
    y = (x.sum(1) > 2).astype(np.int64)
    model = torch.nn.Linear(4, 2)
    ckpt = tmp_path / "t.ckpt"
    train(model, x, y, TrainConfig(epochs=1, batch_size=16), checkpoint=ckpt, progress=False)
    torch.load(ckpt, weights_only=True)
    ckpt.write_bytes(pickle.dumps({"model": object()}))
    with pytest.raises(CheckpointError):
        train(model, x, y, TrainConfig(epochs=2, batch_size=16), checkpoint=ckpt, resume=True, progress=False)


def test_digest_of_a_model_with_scalar_buffers():
    """A 0-dimensional tensor (AlexNet's input scale, say) digests like any other."""
    import torch

    from toolchain.checkpoint import model_digest

    m = torch.nn.Linear(2, 2)
    m.register_buffer("scale", torch.tensor(255.0))
    d = model_digest(m)
    m.scale.fill_(1.0)
    assert model_digest(m) != d
