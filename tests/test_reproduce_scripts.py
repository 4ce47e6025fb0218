"""The reproduction scripts' own logic (their full runs are benchmarks, not tests)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import reproduce_hashednets as hn  # noqa: E402


def test_collapsed_detects_a_constant_predictor():
    x = np.random.default_rng(0).random((500, 1, 28, 28), dtype=np.float32)
    dead = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        dead[1].weight.zero_()
        dead[1].bias.copy_(torch.arange(10.0))  # always class 9
    assert hn.collapsed(dead, x)
    torch.manual_seed(0)
    alive = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        alive[1].weight.normal_(0, 1.0)
    assert not hn.collapsed(alive, x)
    assert alive.training and dead.training  # left in training mode


def test_table_marks_best_retried_and_failed_runs():
    runs = {}
    for arch in hn.ARCHS:
        runs[f"{arch}/dense"] = {"error": 0.015, "stored_weights": 1000, "lr": 0.1}
        for c in ("1/8", "1/64"):
            for i, m in enumerate(hn.METHODS):
                runs[f"{arch}/{c}/{m}"] = {"error": 0.02 + 0.001 * i, "stored_weights": 100 + i, "lr": 0.1}
    runs["5-layer/1/64/HashNet"] = {"error": 0.018, "stored_weights": 105, "lr": 0.1 / 3}
    runs["5-layer/1/64/RER"] = {"error": None, "stored_weights": 100, "lr": 0.1 / 9}
    text = hn.table({"settings": {"lr": 0.1}, "runs": runs})
    row = next(line for line in text.splitlines() if line.startswith("| 5-layer | 1/64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "1.50"  # dense
    assert cells[3] == "failed (lr 0.0111)"  # RER failed at every rate
    assert cells[7] == "**1.80** (lr 0.0333)"  # HashNet: best, retried
    first = next(line for line in text.splitlines() if line.startswith("| 3-layer | 1/8 |"))
    assert "**2.00**" in first and first.count("**") == 2  # RER best there, nothing else bold


def test_denil_dictionary_sizes_reach_the_target_fraction(lenet300_path, lenet5_path):
    import reproduce_denil as dn

    from converters import import_onnx

    for path, layers in ((lenet300_path, dn.MODELS["lenet-300-100"]), (lenet5_path, dn.MODELS["lenet-5"])):
        net = import_onnx(path)
        for target in dn.TARGETS:
            atoms, reached = dn.dictionary_sizes(net, layers, target)
            assert target <= reached < target + 0.01, (path.name, target, reached)
            assert set(atoms) == set(layers) and all(a >= 1 for a in atoms.values())
    atoms, _ = dn.dictionary_sizes(import_onnx(lenet300_path), dn.MODELS["lenet-300-100"], 0.9)
    assert atoms == {"ip1": 75, "ip2": 28}  # the table's 90.1% row


def test_bench_sparse_conv_runs_with_a_fused_max_pool(capsys):
    # a smoke run of the benchmark (its own output check against dense Conv + MaxPool included)
    import bench_sparse_conv as bsc

    assert bsc.main(["--max-pool", "2", "--batches", "1", "16", "--layers", "lenet5.conv2", "reuse25",
                     "--budget", "0", "--min-runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "2x2 max pool fused" in out
    rows = [line for line in out.splitlines() if line.startswith(("| lenet5.conv2 |", "| reuse25 |"))]
    assert len(rows) == 4 and all(r.count("|") == 12 for r in rows)


def test_spmv_floor_probe_runs_and_checks_its_product(capsys):
    # a smoke run of the floor probe (it compiles C++ and returns 1 if its product disagrees with float64)
    import shutil

    import spmv_floor_probe as probe

    if not (shutil.which("g++") or shutil.which("c++")) or not {"avx2", "fma"} <= probe.cpu_flags():
        pytest.skip("needs a C++ compiler and an AVX2 + FMA CPU")
    assert probe.main(["--runs", "1", "--rows", "64", "--bw-mib", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| probe")]
    assert [r.split("|")[1].strip() for r in rows] == list(probe.PROBES)
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # x floor
    assert rows[-1].split("|")[5].strip() == "1.00"  # one_stream is the floor


def test_bench_sparse_fc_linear_paths_reports_which_path_auto_takes(capsys):
    # a smoke run of the small-batch comparison: the default runs batch 2 row by row and batch 4 as a tile
    import bench_sparse_fc as bsf

    assert bsf.main(["--linear-paths", "--batches", "2", "4", "--runs", "1", "--warmup", "0"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| fp32 |", "| cb4 |", "| int8 |"))]
    assert [(r[0].strip(), r[1].strip(), r[5].strip()) for r in rows] == [
        (form, batch, path) for form in ("fp32", "cb4", "int8") for batch, path in (("2", "rowwise"), ("4", "tile"))]


def test_bench_sparse_fc_compare_lib_against_itself(capsys, tmp_path):
    # a smoke run of the A/B of two library builds: this checkout's library against a copy of itself gives
    # one row per form and ISA path with bitwise-equal outputs; a missing file is refused
    import shutil

    import bench_sparse_fc as bsf
    from toolchain import kernels

    copy = tmp_path / "copy.so"
    shutil.copy(kernels.library_path(build=True), copy)
    assert bsf.main(["--compare-lib", str(copy), "--batches", "1", "--runs", "1", "--warmup", "0"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| fp32 |", "| cb4 |", "| int8 |"))]
    paths = ["portable"] + (["avx2"] if {"avx2", "fma"} <= bsf.cpu_flags() else [])
    paths += ["avx512"] if {"avx2", "fma", "avx512f", "avx512bw", "avx512vl"} <= bsf.cpu_flags() else []
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(f, p) for f in ("fp32", "cb4", "int8") for p in paths]
    assert {r[-1].strip() for r in rows} == {"0.0e+00"}
    assert bsf.main(["--compare-lib", str(tmp_path / "missing.so")]) == 2

    # --files: a fast-form file of one's own instead of the fc stack
    import numpy as np
    import onnx

    from toolchain.methods.prune import csr

    w = np.where(np.random.default_rng(0).random((7, 20)) < 0.3, 1.0, 0.0).astype(np.float32)
    onnx.save(csr.make_sparse_linear_model(w, None), tmp_path / "tiny.onnx")
    assert bsf.main(["--compare-lib", str(copy), "--files", str(tmp_path / "tiny.onnx"), "--batches", "1", "5",
                     "--runs", "1", "--warmup", "0"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny.onnx |")]
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [(p, b) for b in ("1", "5") for p in paths]
    assert bsf.main(["--compare-lib", str(copy), "--files", str(tmp_path / "missing.onnx")]) == 2


def test_read_bandwidth_measures_every_call(monkeypatch):
    # bench_sparse_fc --deepsparse takes a floor per repetition from read_bandwidth; memory_bandwidth (one
    # measurement per process for toolchain bench) is the cached one
    import numpy as np

    from toolchain import bench

    made = []
    ones = np.ones
    monkeypatch.setattr(np, "ones", lambda *a, **k: made.append(1) or ones(*a, **k))
    for _ in range(2):
        assert bench.read_bandwidth(4, 1) > 0
    assert len(made) == 2
    bench.memory_bandwidth(4, 1)
    bench.memory_bandwidth(4, 1)
    assert len(made) == 3
