"""ImageNet-style folder / file-list data: Caffe AlexNet preprocessing, DataLoader workers, errors,
one real AlexNet SGD step on it, and onnxruntime evaluation through iterate_eval_batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from toolchain.data.imagenet import crop_size, iterate_eval_batches, open_imagenet
from toolchain.errors import DataError

COLORS = {"a_red": (255, 0, 0), "b_green": (0, 255, 0), "c_blue": (0, 0, 255)}  # RGB; class index = sorted name


def _solid(path, rgb, size, fmt=None):
    Image.new("RGB", size, rgb).save(path, fmt)


def _position_image(path):
    """256x256 PNG whose R channel is the column and G channel the row: crops reveal their offsets."""
    cols, rows = np.meshgrid(np.arange(256), np.arange(256))
    arr = np.stack([cols, rows, np.full_like(cols, 7)], -1).astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """DIR/train/<class>/ (3 images per class, odd sizes, PNG and JPEG) and DIR/val/<class>/ (2 per class)."""
    root = tmp_path_factory.mktemp("imagenet")
    sizes = [(300, 280), (200, 350), (256, 256)]
    for split, count in (("train", 3), ("val", 2)):
        for name, rgb in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                _solid(root / split / name / f"img{i}.png", rgb, sizes[i])
            (root / split / name / "notes.txt").write_text("not an image: ignored")
    _solid(root / "train" / "a_red" / "photo.JPEG", COLORS["a_red"], (500, 375), "JPEG")
    return root


def test_class_folders_are_indexed_in_sorted_order(imagenet_dir):
    src = open_imagenet(imagenet_dir, 227, train=True, split="train", num_workers=0)
    assert src.classes == sorted(COLORS)
    assert len(src) == 10 and src.num_classes == 3
    assert list(src.labels) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert src.paths[3].endswith("a_red/photo.JPEG") and src.paths[4].endswith("b_green/img0.png")


def test_eval_batches_are_bgr_in_unit_range_with_class_labels(imagenet_dir):
    batches = list(iterate_eval_batches(imagenet_dir, ["batch", 3, 227, 227], batch_size=4, progress=False,
                                        num_workers=2))
    assert [len(y) for _, y in batches] == [4, 2]  # DIR/val: 6 images
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (6, 3, 227, 227) and x.dtype == np.float32 and y.dtype == np.int64
    assert list(y) == [0, 0, 1, 1, 2, 2]
    assert x.min() >= 0 and x.max() <= 1
    # Channel order B, G, R: red images light channel 2, blue ones channel 0.
    for img, label in zip(x, y):
        lit = {0: 2, 1: 1, 2: 0}[int(label)]
        assert np.allclose(img[lit], 1.0) and np.allclose(np.delete(img, lit, axis=0), 0.0)


def test_center_crop_for_eval_and_seeded_random_crop_and_mirror_for_training(tmp_path):
    (tmp_path / "only").mkdir()
    _position_image(tmp_path / "only" / "grid.png")
    x, _ = next(iterate_eval_batches(tmp_path, [1, 3, 227, 227], progress=False, num_workers=0))
    # Centre crop of 256: offset (256 - 227) // 2 = 14. BGR: channel 2 is R (= column), 1 is G (= row).
    assert x[0, 2, 0, 0] * 255 == pytest.approx(14) and x[0, 1, 0, 0] * 255 == pytest.approx(14)
    assert x[0, 2, 0, 226] * 255 == pytest.approx(240) and x[0, 0, 5, 5] * 255 == pytest.approx(7)

    src = open_imagenet(tmp_path, 227, train=True, num_workers=0)
    seen = set()
    for epoch in range(12):
        (a, _), = src.load([np.array([0])], seed=1, epoch=epoch)
        (b, _), = src.load([np.array([0])], seed=1, epoch=epoch)
        assert torch.equal(a, b)  # (seed, epoch, image) decides the crop, nothing else
        cols, rows = (a[0, 2] * 255).round().int(), (a[0, 1] * 255).round().int()
        top, left, mirrored = int(rows[0, 0]), int(cols[0].min()), bool(cols[0, 0] > cols[0, -1])
        assert 0 <= top <= 29 and 0 <= left <= 29  # 256 - 227 + 1 positions
        assert abs(int(cols[0, 0] - cols[0, -1])) == 226 and int(rows[-1, 0]) == top + 226
        seen.add((top, left, mirrored))
    assert len(seen) > 6 and {m for *_, m in seen} == {True, False}


def test_crop_size_from_model_input_shape(tmp_path):
    assert crop_size(["N", 3, 224, 224]) == 224 and crop_size((3, 227, 227)) == 227
    for bad in (["N", 1, 28, 28], ["N", 3, "h", "w"], [1, 3, 227, 200], [784]):
        with pytest.raises(DataError, match="not a square 3-channel image input"):
            crop_size(bad)
    (tmp_path / "c").mkdir()
    _position_image(tmp_path / "c" / "grid.png")
    x, _ = next(iterate_eval_batches(tmp_path, [None, 3, 224, 224], progress=False, num_workers=0))
    assert x.shape == (1, 3, 224, 224) and x[0, 2, 0, 0] * 255 == pytest.approx(16)


def test_caffe_file_list(imagenet_dir, tmp_path):
    # DIR/val.txt wins over DIR/val/, and its relative paths are read under DIR/val/.
    root = tmp_path / "d"
    (root / "val").mkdir(parents=True)
    for name in ("x.png", "y.png"):
        _solid(root / "val" / name, (0, 0, 255), (64, 64))
    (root / "val.txt").write_text("x.png 5\n\ny.png 7\n")
    src = open_imagenet(root, 227, train=False, split="val", num_workers=0)
    assert list(src.labels) == [5, 7] and src.classes is None and src.num_classes == 8
    ys = np.concatenate([y for _, y in iterate_eval_batches(root, [1, 3, 227, 227], progress=False, num_workers=0)])
    assert list(ys) == [5, 7]
    # A list named directly; absolute paths are kept.
    lst = tmp_path / "list.txt"
    lst.write_text(f"{imagenet_dir}/train/b_green/img0.png 1\n{imagenet_dir}/train/a_red/img1.png 0\n")
    src = open_imagenet(lst, 227, train=True, num_workers=0)
    assert list(src.labels) == [1, 0] and src.paths[0] == f"{imagenet_dir}/train/b_green/img0.png"
    (x, y), = src.load([np.array([0, 1])])
    assert x.shape == (2, 3, 227, 227) and list(y) == [1, 0] and torch.allclose(x[0, 1], torch.ones(227, 227))


def test_limit_spreads_over_the_list(imagenet_dir):
    ys = np.concatenate([y for _, y in iterate_eval_batches(imagenet_dir, [1, 3, 227, 227], limit=3,
                                                            progress=False, num_workers=0)])
    assert sorted(ys) == [0, 1, 2]  # one image of each class, not the first three of class 0


def test_bad_input_is_a_one_line_data_error(imagenet_dir, tmp_path):
    shape = [1, 3, 227, 227]
    with pytest.raises(DataError, match="does not exist"):
        list(iterate_eval_batches(tmp_path / "missing", shape, progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        list(iterate_eval_batches(tmp_path / "empty", shape, progress=False))
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="has no images"):
        list(iterate_eval_batches(tmp_path / "noimg", shape, progress=False))
    with pytest.raises(DataError, match=r"neither train/ .* nor train\.txt"):
        open_imagenet(tmp_path / "noimg", 227, train=True, split="train", require_split=True)
    (tmp_path / "lst.txt").write_text("a.png 1\nb.png cat\n")
    with pytest.raises(DataError, match=r"lst\.txt:2: expected 'path label'"):
        open_imagenet(tmp_path / "lst.txt", 227, train=False)
    # An unreadable image, decoded in a worker process: the error names the file, on one line.
    bad = tmp_path / "bad"
    (bad / "cls").mkdir(parents=True)
    _solid(bad / "cls" / "good.png", (1, 2, 3), (40, 40))
    (bad / "cls" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError) as e:
        list(iterate_eval_batches(bad, shape, batch_size=2, progress=False, num_workers=2))
    assert "broken.jpg" in str(e.value) and "\n" not in str(e.value)
    (bad / "cls" / "broken.jpg").unlink()
    (tmp_path / "bad.txt").write_text("cls/good.png 0\ncls/gone.png 0\n")
    with pytest.raises(DataError, match=r"cannot read image .*gone\.png: No such file"):
        list(iterate_eval_batches(tmp_path / "bad.txt", shape, progress=False, num_workers=0))


def test_one_alexnet_sgd_step_on_an_image_folder(imagenet_dir):
    from toolchain.driver import load_training_data
    from toolchain.recipe import Recipe
    from toolchain.train import TrainConfig, evaluate, train
    from toolchain.zoo import create_model, get_model_spec

    spec = get_model_spec("alexnet")
    train_src, train_y, val_src, val_y = load_training_data(Recipe("r", dataset="imagenet"), imagenet_dir,
                                                            input_shape=[1, *spec.input_shape], num_workers=2)
    assert train_y is None and val_y is None and (len(train_src), len(val_src)) == (10, 6)
    torch.manual_seed(0)
    net = create_model("alexnet")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(epochs=0.2, batch_size=2, lr=0.01, lr_policy="fixed", weight_decay=0.0)  # 1 of 5 steps
    train(net, train_src, None, cfg, progress=False)
    after = net.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert {"conv1.weight", "conv2.weight", "fc6.weight", "fc8.weight", "fc8.bias"} <= set(changed)
    assert "data_norm.mean" not in changed
    assert all(torch.isfinite(v).all() for v in after.values())
    err = evaluate(net, val_src, None, batch_size=4)
    assert err in {i / 6 for i in range(7)}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter announces its deprecation
def test_onnx_eval_on_an_image_folder(imagenet_dir, tmp_path):
    """`toolchain eval --dataset imagenet` scores a colour classifier perfectly on the val folder."""
    from toolchain.cli import main
    from toolchain.accuracy import evaluate_onnx

    class ColourNet(nn.Module):
        def forward(self, x):  # logits of (red, green, blue, 0, 0, 0): BGR input, so channels 2, 1, 0
            m = x.mean((2, 3))
            return torch.cat([m[:, [2, 1, 0]], torch.zeros_like(m)], 1)

    path = tmp_path / "colour.onnx"
    torch.onnx.export(ColourNet(), torch.zeros(1, 3, 227, 227), path, dynamo=False, input_names=["data"],
                      output_names=["prob"], dynamic_axes={"data": {0: "N"}, "prob": {0: "N"}})
    r = evaluate_onnx(path, "imagenet", imagenet_dir, batch_size=4, progress=False)
    assert (r.error, r.samples) == (0.0, 6) and r.top5_error == 0.0
    assert main(["eval", str(path), "--dataset", "imagenet", "--data", str(imagenet_dir), "--no-progress"]) == 0
    assert main(["eval", str(path), "--dataset", "imagenet", "--data", str(tmp_path / "nope"), "--no-progress"]) == 2


def test_alexnet_prune_recipe_follows_han_et_al():
    from converters.ir import Network, Node

    from toolchain.recipe import load_recipe
    from toolchain.zoo import MODELS_DIR, create_model

    recipe = load_recipe(MODELS_DIR / "alexnet" / "prune.toml")
    assert recipe.dataset == "imagenet" and [s.only for s in recipe.stages] == ["conv", "fc"]
    seq = create_model("alexnet")
    nodes, value = [], "data"
    for name, module in seq.named_children():
        nodes.append(Node(name, type(module).__name__, [value], [f"{name}_out"]))
        value = f"{name}_out"
    net = Network(nodes, dict(seq.named_children()), {}, ["data"], [value], {"data": ["N", 3, 227, 227]})
    table4 = {"conv1": 0.84, "conv2": 0.38, "conv3": 0.35, "conv4": 0.37, "conv5": 0.37,
              "fc6": 0.09, "fc7": 0.09, "fc8": 0.25}
    got = {}
    for stage in recipe.stages:
        assert stage.options.rounds >= 2 and stage.retrain.lr == pytest.approx(0.01 / 100)
        got.update({n: lo.density for n, lo in stage.make_pass(net).layer_options.items()})
    assert got == table4
    layers = net.layers()
    total = sum(layers[n].weight.numel() for n in table4)
    kept = sum(layers[n].weight.numel() * d for n, d in table4.items())
    assert 8.9 < total / kept < 9.1  # the paper's 9x
