"""Tests that pin behaviour (each fails when the behaviour it names breaks): golden hash values,
masks in forward, dropout rescaling, the gradual schedule, retrain_final, the `only` filter, the
shipped models' quoted numbers, and the `train` / `zoo export` commands."""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import toolchain.driver as driver
from converters import Network, Node, import_onnx
from toolchain.cli import main
from toolchain.zoo import MODELS_DIR


# ------------------------------------------------------------------ hashed layers: golden values
GOLDEN = {  # seed -> (buckets of virtual weights 0..11 into 7, signs of 0..11)
    0: ([4, 4, 4, 1, 6, 0, 3, 3, 4, 4, 6, 6], [-1, -1, 1, 1, -1, 1, 1, -1, 1, -1, -1, 1]),
    1: ([4, 3, 3, 0, 5, 2, 2, 1, 5, 2, 5, 3], [-1, -1, -1, 1, -1, 1, -1, -1, -1, 1, 1, -1]),
    12345: ([3, 0, 0, 4, 0, 4, 5, 4, 3, 4, 2, 0], [-1, 1, 1, -1, 1, 1, 1, 1, -1, -1, 1, 1]),
    2**32 - 1: ([6, 5, 2, 4, 3, 3, 4, 3, 0, 0, 2, 4], [1, 1, 1, -1, 1, -1, 1, 1, -1, -1, 1, 1]),
}


@pytest.mark.parametrize("seed", list(GOLDEN))
def test_hash_values_are_golden(seed):
    """Shipped hashed files store only K weights + seeds: any change of the hash changes every model."""
    from toolchain.methods.hashed.layers import hash_buckets, hash_signs

    buckets, signs = GOLDEN[seed]
    assert hash_buckets(seed, 12, 7).tolist() == buckets
    assert hash_signs(seed, 12).tolist() == signs


def test_hash_values_of_a_large_layer_are_golden():
    from toolchain.methods.hashed.layers import hash_buckets, hash_signs

    b, s = hash_buckets(7, 100000, 1000), hash_signs(7, 100000)
    assert hashlib.sha256(b.astype("<i8").tobytes()).hexdigest()[:32] == "20074a825c3c827c97f2779bce0988d2"
    assert hashlib.sha256(s.astype("i1").tobytes()).hexdigest()[:32] == "e889a90a0f72134214457cbb8977f806"


# ------------------------------------------------------------------ shipped models: the quoted numbers
def _card_rows():
    rows = []
    for card in sorted(MODELS_DIR.glob("*/README.md")):
        text = card.read_text()
        folder = card.parent
        for m in re.finditer(r"^\| `([\w.-]+\.onnx)` \|.*\| ([\d,]+) \| \*\*([\d.]+)%\*\* \|$", text, re.M):
            rows.append((folder / m[1], int(m[2].replace(",", "")), float(m[3]), None))
        dc = re.search(r"^\| test error \(stock onnxruntime\) \| [\d.]+% \| [\d.]+% \| \*\*([\d.]+)%\*\*", text, re.M)
        dc_size = re.search(r"([\d,]+) B shipped", text)
        if dc and dc_size:
            rows.append((folder / f"{folder.name}-deep-compression.onnx", int(dc_size[1].replace(",", "")),
                         float(dc[1]), None))
        int8 = re.search(r"`([\w.-]+-pruned-int8\.onnx)` is .*?([\d.]+)% test error, ([\d,]+) B", text, re.S)
        if int8:
            rows.append((folder / int8[1], int(int8[3].replace(",", "")), float(int8[2]), None))
        # record and structured sections: "## ...: `FILE.onnx`" then a table with the test error, the
        # non-zero parameters (records) and the file size (records) of the second column
        for sec in re.finditer(r"^## [^\n]*`([\w.-]+\.onnx)`\n(.*?)(?=^## |\Z)", text, re.M | re.S):
            body = sec[2]
            err = re.search(r"^\| test error \(stock onnxruntime, measured once\) \| [\d.]+% \| \*\*([\d.]+)%\*\*", body, re.M)
            nz = re.search(r"^\| non-zero parameters \(weights \+ biases\) \| [\d,]+ \| \*\*([\d,]+)\*\*", body, re.M)
            fb = re.search(r"^\| file \| [\d,]+ bytes \| ([\d,]+) bytes", body, re.M)
            if err:
                size = int(fb[1].replace(",", "")) if fb else (folder / sec[1]).stat().st_size
                rows.append((folder / sec[1], size, float(err[1]), int(nz[1].replace(",", "")) if nz else None))
        pruned = re.search(r"^\| test error \| ([\d.]+)% \| \*\*([\d.]+)%\*\*", text, re.M)
        nnz = re.search(r"^\| non-zero parameters \(weights \+ biases\) \| ([\d,]+) \| \*\*([\d,]+)\*\*", text, re.M)
        size = re.search(r"^\| file \| ([\d,]+) bytes \| ([\d,]+) bytes", text, re.M)
        if pruned and nnz and size:
            dense = folder / f"{folder.name}.onnx"
            rows.append((dense, int(size[1].replace(",", "")), float(pruned[1]), int(nnz[1].replace(",", ""))))
            rows.append((folder / f"{folder.name}-pruned.onnx", int(size[2].replace(",", "")), float(pruned[2]),
                         int(nnz[2].replace(",", ""))))
    return rows


CARD_ROWS = _card_rows()


def test_every_shipped_compressed_model_is_quoted_in_its_card():
    quoted = {p.resolve() for p, *_ in CARD_ROWS}
    shipped = {p.resolve() for p in MODELS_DIR.glob("*/*.onnx")}
    assert len(CARD_ROWS) >= 16 and shipped <= quoted, sorted(map(str, shipped - quoted))


@pytest.mark.parametrize("path, size, error, nnz", CARD_ROWS, ids=[p.name for p, *_ in CARD_ROWS])
def test_shipped_model_matches_its_card(path, size, error, nnz):
    from toolchain.accuracy import evaluate_onnx
    from toolchain.measure import measure

    assert path.stat().st_size == size, f"{path.name}: {path.stat().st_size} bytes, the card says {size}"
    r = evaluate_onnx(str(path), progress=False, threads=1)
    assert r.samples == 10000 and round(100 * r.error, 2) == error, f"{path.name}: {100 * r.error:.2f}% vs {error}%"
    if nnz is not None:
        assert measure(str(path))[1]["nnz"] == nnz
    if "hashed" in path.name:  # every shipped hashed file re-imports as hashed layers
        from toolchain.methods.hashed.layers import _Hashed

        layers = import_onnx(path).layers()
        assert layers and all(isinstance(m, _Hashed) for m in layers.values()), \
            {k: type(m).__name__ for k, m in layers.items()}


# ------------------------------------------------------------------ pruning behaviour
def test_a_pruned_conv_layers_mask_is_applied_in_forward():
    from toolchain.methods.prune.layers import MaskedConv2d

    torch.manual_seed(0)
    layer = MaskedConv2d(2, 3, 3, padding=1)
    keep = torch.rand_like(layer.weight) > 0.5
    layer.mask.copy_(keep)  # the weight itself is NOT zeroed: forward alone must apply the mask
    x = torch.randn(2, 2, 5, 5)
    want = nn.functional.conv2d(x, layer.weight * keep, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), want)
    assert not torch.allclose(layer(x), nn.functional.conv2d(x, layer.weight, layer.bias, padding=1))


def _fc_dropout_net(p0=0.5):
    torch.manual_seed(0)
    nodes = [Node("fc1", "Gemm", ["x"], ["h"]), Node("relu", "Relu", ["h"], ["r"]),
             Node("drop", "Dropout", ["r"], ["d"]), Node("fc2", "Gemm", ["d"], ["y"])]
    mods = {"fc1": nn.Linear(20, 30), "relu": nn.ReLU(), "drop": nn.Dropout(p0), "fc2": nn.Linear(30, 4)}
    return Network(nodes, mods, {}, ["x"], ["y"], {"x": ["N", 20]})


def test_dropout_is_rescaled_from_the_original_rate_every_round():
    from toolchain.methods.prune.passes import PruneLayerOptions, PruneOptions, PrunePass

    net = _fc_dropout_net(0.5)
    p = PrunePass(PruneOptions(rounds=3), {"fc1": PruneLayerOptions(quality=0.5)})
    counts = []
    for r in range(3):
        p.apply(net, r)
        nnz = net.layers()["fc1"].nnz()
        counts.append(nnz)
        # D_r = D_o sqrt(C_r / C_o) with the ORIGINAL D_o = 0.5 and C_o = 600 (not compounding)
        assert net.ops["drop"].p == pytest.approx(0.5 * math.sqrt(nnz / 600), rel=1e-12), r
    assert counts[0] > counts[1] > counts[2]  # it pruned in every round, so compounding would show


def test_gradual_schedule_is_cubic():
    from toolchain.methods.prune.passes import PruneLayerOptions, PruneOptions, PrunePass, cubic_density

    # 0.1 + 0.9 (1 - r/4)^3 after rounds 1..4
    assert [cubic_density(0.1, r, 4) for r in range(4)] == pytest.approx([0.4796875, 0.2125, 0.1140625, 0.1], abs=1e-12)
    net = _fc_dropout_net()
    p = PrunePass(PruneOptions(rounds=4, schedule="gradual", adjust_dropout=False), {"fc1": PruneLayerOptions(density=0.1)})
    for r in range(4):
        p.apply(net, r)
        assert net.layers()["fc1"].nnz() == max(1, round(cubic_density(0.1, r, 4) * 600)), r


def test_retrain_final_is_applied_to_the_last_round_only(monkeypatch, mnist_small):
    from toolchain.recipe import parse_recipe

    recipe = parse_recipe("""
[[stage]]
pass = "prune"
rounds = 3
[stage.layers.default]
quality = 0.5
[stage.retrain]
epochs = 0.01
lr = 0.02
[stage.retrain_final]
epochs = 0.03
""")
    seen = []
    monkeypatch.setattr(driver, "train", lambda model, x, y, cfg, *a, **k: seen.append((cfg.epochs, cfg.lr)))
    lenet = import_onnx(MODELS_DIR / "lenet-300-100" / "lenet-300-100.onnx")
    driver.compress_network(lenet, recipe, mnist_small, progress=False)
    assert seen == [(0.01, 0.02), (0.01, 0.02), (0.03, 0.02)]


@pytest.mark.parametrize("only, want", [("conv", {"conv1", "conv2"}), ("fc", {"ip1", "ip2"}),
                                        ("all", {"conv1", "conv2", "ip1", "ip2"})])
def test_only_filters_layer_kinds(only, want):
    from toolchain.recipe import parse_recipe

    net = import_onnx(MODELS_DIR / "lenet-5" / "lenet-5.onnx")
    recipe = parse_recipe(f'[[stage]]\npass = "prune"\nonly = "{only}"\n[stage.layers.default]\nquality = 1.0\n')
    assert set(recipe.stages[0].make_pass(net).layer_options) == want


# ------------------------------------------------------------------ commands
def test_cli_train_tiny(tmp_path, capsys):
    cfg = tmp_path / "train.toml"
    cfg.write_text("epochs = 0.1\nbatch_size = 100\nlr = 0.05\nseed = 3\n")
    out = tmp_path / "m.onnx"
    assert main(["train", "lenet-300-100", "--config", str(cfg), "-o", str(out), "--threads", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    err = float(re.search(r"test error ([\d.]+)%", text)[1])
    assert "trained on 50000 images; validation error" in text and "(10000 held out)" in text
    assert not (tmp_path / "m.onnx.ckpt").exists()  # a finished run leaves no checkpoint behind
    from toolchain import file_metadata

    meta = file_metadata(out)
    assert meta["ai.toolchain.train_images"] == "50000" and 0 < float(meta["ai.toolchain.validation_error"]) < 1
    assert out.exists()
    from toolchain.accuracy import evaluate_onnx

    assert err < 50 and round(100 * evaluate_onnx(str(out), progress=False).error, 2) == err
    assert main(["train", "lenet-300-100", "--config", str(cfg), "-o", str(out), "--val-split", "0.5",
                 "--threads", "1", "--no-progress"]) == 0
    assert "trained on 30000 images" in capsys.readouterr().out


def test_cli_zoo_export(tmp_path, capsys):
    out = tmp_path / "lenet5.onnx"
    assert main(["zoo", "export", "lenet-5", "-o", str(out)]) == 0
    assert out.read_bytes() == (MODELS_DIR / "lenet-5" / "lenet-5.onnx").read_bytes()
    fresh = tmp_path / "fresh.onnx"
    assert main(["zoo", "export", "lenet-300-100", "-o", str(fresh), "--init", "--seed", "4"]) == 0
    assert "initialised with seed 4" in capsys.readouterr().out
    net = import_onnx(fresh)
    assert set(net.layers()) == {"ip1", "ip2", "ip3"}
    assert not np.array_equal(onnx.load(str(fresh)).graph.initializer[0].raw_data,
                              onnx.load(str(MODELS_DIR / "lenet-300-100" / "lenet-300-100.onnx")).graph.initializer[0].raw_data)


# ------------------------------------------------------------------ gaps found by mutation testing
@pytest.mark.parametrize("cls, args", [("HashedLinear", (6, 4, 5)), ("HashedConv2d", (2, 3, 3, 7))])
def test_hashed_layers_default_seed_and_virtual_weight(cls, args):
    from toolchain.methods.hashed import layers as H

    layer = getattr(H, cls)(*args)
    assert layer.seed == 0 and layer.bias is not None
    count = math.prod(layer.weight_shape)
    want = layer.weight.detach().numpy()[H.hash_buckets(0, count, layer.buckets)] * H.hash_signs(0, count)
    np.testing.assert_allclose(layer.virtual_weight().detach().numpy().reshape(-1), want, rtol=1e-6)


def test_hashed_conv_checks_groups():
    from toolchain.methods.hashed.layers import HashedConv2d

    with pytest.raises(ValueError):
        HashedConv2d(4, 3, 3, 5, groups=2)  # out_channels not divisible by groups
    with pytest.raises(ValueError):
        HashedConv2d(3, 4, 3, 5, groups=2)  # in_channels not divisible by groups


def test_quality_pruning_keeps_a_layers_last_weight():
    from toolchain.methods.prune.passes import quality_threshold

    w = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    mask = w != 0
    assert quality_threshold(w, mask, 1.0) == 0.0  # std of one weight is undefined: keep it, not prune all
    w2 = torch.tensor([[1.0, 3.0]])
    assert quality_threshold(w2, torch.ones_like(w2, dtype=torch.bool), 2.0) == pytest.approx(2 * float(w2.std()))


def test_dropout_rescaling_is_per_layer():
    from toolchain.methods.prune.passes import PruneLayerOptions, PruneOptions, PrunePass

    torch.manual_seed(0)
    nodes = [Node("fc1", "Gemm", ["x"], ["h"]), Node("d1", "Dropout", ["h"], ["a"]),
             Node("fc2", "Gemm", ["a"], ["g"]), Node("d2", "Dropout", ["g"], ["b"]), Node("fc3", "Gemm", ["b"], ["y"])]
    mods = {"fc1": nn.Linear(20, 30), "d1": nn.Dropout(0.5), "fc2": nn.Linear(30, 30), "d2": nn.Dropout(0.2),
            "fc3": nn.Linear(30, 4)}
    net = Network(nodes, mods, {}, ["x"], ["y"], {"x": ["N", 20]})
    p = PrunePass(PruneOptions(rounds=2), {"fc1": PruneLayerOptions(quality=0.6), "fc2": PruneLayerOptions(quality=1.0)})
    for r in range(2):
        p.apply(net, r)
        l1, l2 = net.layers()["fc1"], net.layers()["fc2"]
        assert net.ops["d1"].p == pytest.approx(0.5 * math.sqrt(l1.nnz() / 600))
        assert net.ops["d2"].p == pytest.approx(0.2 * math.sqrt(l2.nnz() / 900))
    lines = p.summary(net)
    assert lines[:2] == [f"fc1: {l1.density():.2%} of its remaining weights kept",
                         f"fc2: {l2.density():.2%} of its remaining weights kept"]


def test_sparse_encoding_round_trip_with_adjacent_and_far_nonzeros():
    from toolchain.errors import ModelFormatError
    from toolchain.methods.prune.sparse_format import EncodedSparse, decode, encode

    w = np.zeros(70000, np.float32)
    w[[0, 1, 2, 300, 301, 69999]] = [1, -2, 3, -4, 5, 6]  # gaps of 1, a long gap needing fillers
    for shape in ((70000,), (7, 10000)):
        enc = encode(w.reshape(shape))
        out = decode(enc, shape)
        assert out.dtype == np.float32 and np.array_equal(out.reshape(-1), w)
    with pytest.raises(ModelFormatError, match="3 values but 2 indices"):
        decode(EncodedSparse(np.ones(3, np.float32), np.array([1, 2], np.int32), "positions", 10), (10,))
