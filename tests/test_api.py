"""The public Python API on the user's own modules: compress, export (both forms), load."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import toolchain
from converters.registry import Registry
from toolchain.errors import DataError, RecipeError, RegistryError
from toolchain.methods.prune import MaskedConv2d, MaskedLinear

ROOT = Path(__file__).resolve().parent.parent
PRUNE = {"seed": 3, "stage": [{"pass": "prune", "rounds": 2, "layers": {"default": {"quality": 0.8}},
                              "retrain": {"epochs": 0.5, "batch_size": 100, "lr": 0.02}}]}


class LeNet5BN(nn.Module):
    """A user's LeNet-5 with BatchNorm and Dropout and a functional forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 20, 5), nn.BatchNorm2d(20)
        self.conv2, self.bn2 = nn.Conv2d(20, 50, 5), nn.BatchNorm2d(50)
        self.fc1, self.drop, self.fc2 = nn.Linear(800, 500), nn.Dropout(0.5), nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def mlp():
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


@pytest.fixture(scope="module")
def data(mnist_small):
    x, y, tx, ty = mnist_small
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(tx), torch.from_numpy(ty)


def _ort(path, x):
    so = ort.SessionOptions()
    if any(n.domain == "ai.toolchain" for n in __import__("onnx").load(str(path)).graph.node):
        toolchain.kernels.register(so)
    sess = ort.InferenceSession(str(path), so)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def trained_mlp(lenet300_path):
    """The user's own nn.Sequential holding a trained LeNet-300-100 (the shipped file's weights)."""
    model = mlp()
    for dst, src in zip((model[0], model[2], model[4]), toolchain.load(lenet300_path).layers().values()):
        dst.load_state_dict(src.state_dict())
    return model


def test_sequential_mlp_in_ten_lines(tmp_path, data, lenet300_path):
    torch.manual_seed(0)
    x, y, tx, ty = data
    model = trained_mlp(lenet300_path)
    result = toolchain.compress(model, PRUNE, data=(x.reshape(-1, 784), y, tx, ty), progress=False)
    toolchain.export(result.model, tmp_path / "m.onnx", result=result)
    toolchain.export(result.model, tmp_path / "f.onnx", form="fast", result=result)
    back, fast = toolchain.load(tmp_path / "m.onnx"), toolchain.load(tmp_path / "f.onnx")

    assert result.model is model and isinstance(model, nn.Sequential)
    assert all(isinstance(model[i], MaskedLinear) for i in (0, 2, 4))
    assert result.error_before < 0.03 and result.error_after < 0.05
    assert 0.1 < sum(model[i].nnz() for i in (0, 2, 4)) / 266_610 < 0.6
    model.eval()
    ref = model(tx[:64].reshape(-1, 784)).detach().numpy()
    for path in ("m.onnx", "f.onnx"):
        np.testing.assert_allclose(_ort(tmp_path / path, tx[:64].reshape(-1, 784)), ref, atol=1e-5)
    for net in (back, fast):  # masks come back from both forms
        layers = list(net.layers().values())
        assert all(isinstance(m, MaskedLinear) for m in layers)
        for i, m in zip((0, 2, 4), layers):
            assert torch.equal(m.mask, model[i].mask)
    meta = toolchain.file_metadata(tmp_path / "m.onnx")
    proto = __import__("onnx").load(str(tmp_path / "m.onnx"))
    assert (proto.producer_name, proto.producer_version) == ("toolchain", toolchain.__version__)
    assert "prune" in meta["ai.toolchain.recipe"] and "ai.toolchain.original" in meta
    assert abs(float(meta["ai.toolchain.test_error"]) - result.error_after) < 1e-6


def test_lenet5_with_batchnorm_and_dropout(tmp_path, data):
    torch.manual_seed(1)
    x, y, tx, ty = data
    model = LeNet5BN()
    bn1, drop = model.bn1, model.drop
    stats_before = bn1.running_mean.clone()
    result = toolchain.compress(model, PRUNE, data=(x, y, tx, ty), progress=False)
    assert type(result.model) is LeNet5BN and result.model is model
    assert model.bn1 is bn1 and model.drop is drop  # BatchNorm and Dropout kept, not folded or dropped
    assert not torch.equal(bn1.running_mean, stats_before)  # BatchNorm statistics updated while retraining
    assert isinstance(model.conv1, MaskedConv2d) and isinstance(model.fc1, MaskedLinear)
    for m in (model.conv1, model.conv2, model.fc1, model.fc2):
        assert torch.all(m.weight[~m.mask] == 0)  # pruned weights stayed zero through retraining
    assert result.error_after < result.error_before - 0.2  # an untrained net: retraining did train it
    toolchain.export(model, tmp_path / "le.onnx", result=result)
    toolchain.export(model, tmp_path / "le-fast.onnx", form="fast", example_input=tx[:2])
    model.eval()
    ref = model(tx[:32]).detach().numpy()
    for path in ("le.onnx", "le-fast.onnx"):
        np.testing.assert_allclose(_ort(tmp_path / path, tx[:32]), ref, atol=1e-4)
    back = toolchain.load(tmp_path / "le.onnx")
    assert sum(isinstance(m, (MaskedLinear, MaskedConv2d)) for m in back.layers().values()) == 4


def test_own_optimizer_loss_and_dataloaders(data, lenet300_path):
    x, y, tx, ty = data
    calls = {"opt": 0, "loss": 0}

    def make_opt(params):
        calls["opt"] += 1
        return torch.optim.Adam(params, lr=1e-3)

    def loss(out, labels):
        calls["loss"] += 1
        return F.cross_entropy(out, labels)

    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1000].reshape(-1, 784), y[:1000]))
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tx[:500].reshape(-1, 784), ty[:500]))
    recipe = toolchain.Recipe.parse("""
        [[stage]]
        pass = "prune"
        [stage.layers.default]
        density = 0.3
        [stage.retrain]
        epochs = 1
        batch_size = 100
    """)
    result = toolchain.compress(trained_mlp(lenet300_path), recipe, data=(train, test), optimizer=make_opt, loss=loss,
                                progress=False)
    assert calls == {"opt": 1, "loss": 10}
    assert result.error_before < 0.03 and result.error_after < 0.1


def test_recipe_names_module_paths():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(784, 50), nn.ReLU()), nn.Linear(50, 10))
    recipe = {"stage": [{"pass": "prune", "layers": {"1.0": {"density": 0.5}}, "retrain": {"epochs": 0}}]}
    result = toolchain.compress(model, recipe, data=(torch.rand(20, 1, 28, 28), torch.zeros(20, dtype=torch.long)),
                                progress=False)
    assert isinstance(model[1][0], MaskedLinear) and not isinstance(model[2], MaskedLinear)
    assert abs(model[1][0].density() - 0.5) < 0.01
    assert "1_0" in result.table()


@pytest.mark.parametrize("model, recipe, data, error, words", [
    (nn.Sequential(nn.ReLU()), PRUNE, None, RecipeError, "no layer the recipe can act on"),
    (mlp(), {"stage": [{"pass": "prune", "layers": {"fc9": {"quality": 1.0}}}]}, None, RecipeError, "'fc9' is not in the model"),
    (mlp(), {"stage": [{"pass": "prune", "only": "conv", "layers": {"default": {"quality": 1.0}}}]}, None, RecipeError,
     "selects no layer"),
    (mlp(), PRUNE, (torch.rand(10, 3, 32, 32), torch.zeros(10, dtype=torch.long)), DataError, "do not fit"),
    (LeNet5BN(), PRUNE, (torch.rand(10, 784), torch.zeros(10, dtype=torch.long)), DataError, "do not fit"),
    (mlp(), {"stage": [{"pass": "prune", "layers": {"default": {"quality": 1.0}}, "retrain": {"lr_policy": "x"}}]}, None,
     RecipeError, "lr_policy"),
])
def test_bad_input_fails_before_training(model, recipe, data, error, words, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr("toolchain.driver.train", no_training)
    monkeypatch.setattr("toolchain.driver.load_training_data", no_training)
    with pytest.raises(error, match=words):
        toolchain.compress(model, recipe, data=data, progress=False)


def test_resume_a_users_module(tmp_path, data):
    x, y, tx, ty = data
    recipe = {"seed": 5, "stage": [{"pass": "prune", "rounds": 2, "layers": {"default": {"quality": 0.7}},
                                    "retrain": {"epochs": 0.2, "batch_size": 100}}]}
    d = (x.reshape(-1, 784), y, tx, ty)
    torch.manual_seed(0)
    full = toolchain.compress(mlp(), recipe, data=d, progress=False).model
    torch.manual_seed(0)
    model = mlp()
    ckpt = tmp_path / "run.ckpt"
    orig = toolchain.driver.train
    n = {"calls": 0}

    def interrupted(*a, **k):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    toolchain.driver.train = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            toolchain.compress(model, recipe, data=d, checkpoint=ckpt, progress=False)
    finally:
        toolchain.driver.train = orig
    torch.manual_seed(0)
    fresh = mlp()
    toolchain.compress(fresh, recipe, data=d, checkpoint=ckpt, resume=True, progress=False)
    for a, b in zip(full.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_registry_rejects_duplicates():
    reg = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.add("a", 2)
    with pytest.raises(RegistryError, match="unknown thing 'b'; available: a"):
        reg["b"]
    with pytest.raises(RegistryError, match="registered twice"):
        toolchain.register_pass("prune")(type("Again", (toolchain.CompressionPass,), {}))


def test_imports_go_one_way():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py"), "--depth", "2", "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "upward imports: 0" in out.stdout and "cycle: none" in out.stdout


# The public face: `toolchain` itself and these modules (documented in README "Python API"); the rest of
# the package (driver, exporter, train, recipe, runtime, measure, accuracy, api) is internal.
PUBLIC_MODULES = {"toolchain", "toolchain.methods", "toolchain.methods.prune", "toolchain.methods.lowrank",
                  "toolchain.methods.hashed", "toolchain.methods.quantize", "toolchain.methods.sparse_vd",
                  "toolchain.methods.splicing", "toolchain.methods.global_prune", "toolchain.methods.structured", "toolchain.kernels", "toolchain.data", "toolchain.zoo", "toolchain.bench",
                  "toolchain.plots", "toolchain.sensitivity", "toolchain.distributed", "toolchain.cli",
                  "toolchain.errors", "converters", "converters.caffe"}


def _imported_modules(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.name}: relative import (from {'.' * node.level}{node.module or ''})")
    return {m for m in out if m.split(".")[0] in ("toolchain", "converters")}


@pytest.mark.parametrize("path", sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "toolchain" / "commands").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_tools_and_commands_use_only_the_public_api(path):
    private = _imported_modules(path) - PUBLIC_MODULES
    assert not private, f"{path.name} imports internal modules {sorted(private)}"


@pytest.mark.parametrize("folder", ["lenet-300-100", "lenet-5"])
def test_model_cards_name_the_inputs_the_files_have(folder):
    import re

    import onnx

    card = (ROOT / "models" / folder / "README.md").read_text()
    name = re.search(r"^\| input \| `([^`]+)`", card, re.M).group(1)
    for path in sorted((ROOT / "models" / folder).glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        assert [i.name for i in model.graph.input if i.name not in inits] == [name], path.name


def test_shipped_files_carry_their_records():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "record_metadata.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok ") >= 12


def test_every_command_help_ends_with_an_example(capsys):
    from toolchain.cli import COMMANDS, build_parser

    parser = build_parser()
    for name in [*COMMANDS, None]:
        argv = [name.rstrip("_"), "--help"] if name else ["--help"]
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        text = capsys.readouterr().out.rstrip()
        last = text.split("\n\n")[-1]
        assert last.startswith("example") and "toolchain " in last, f"{argv}: {last[:200]}"
