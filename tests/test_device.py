"""Devices, backends, precision and checkpoints across device kinds (issue 16).

On a machine without a GPU the CUDA paths are simulated: torch.cuda.is_available / device_count are
monkeypatched for device and backend selection, and "GPU-written" checkpoints are made by saving with
every storage tagged cuda:0 (exactly what torch.save records for CUDA tensors), then resumed on the CPU.
Tests marked `gpu` run for real on a CUDA machine (tools/gpu_check.sh) and are skipped elsewhere.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import toolchain.driver as compress_mod
from toolchain import distributed as dist_
from toolchain.cli import main
from toolchain.errors import RecipeError, ToolchainError
from toolchain.methods.hashed import HashedLinear
from toolchain.methods.prune import masked_from_dense
from toolchain.methods.prune.passes import density_keep
from toolchain.recipe import parse_recipe
from toolchain.train import TrainConfig, TrainHooks, evaluate, load_checkpoint, train
from toolchain.zoo import create_model

HAS_CUDA = torch.cuda.is_available()
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for k in TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)


def fake_gpus(monkeypatch, n: int) -> None:
    """Make torch report `n` CUDA GPUs (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def fake_torchrun(monkeypatch, rank=0, world=2, local=0, local_world=2) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")


# ----------------------------------------------------------------- device and backend selection
@pytest.mark.parametrize("spec, gpus, want", [
    ("cpu", 0, "cpu"), ("cpu", 2, "cpu"), ("auto", 0, "cpu"), (None, 0, "cpu"), ("auto", 1, "cuda:0"),
    ("cuda", 2, "cuda:0"), ("cuda:1", 2, "cuda:1"), (" CUDA:1 ", 2, "cuda:1"), (torch.device("cuda", 1), 2, "cuda:1"),
    (torch.device("cpu"), 1, "cpu"),
])
def test_resolve_device_single_process(monkeypatch, no_torchrun, spec, gpus, want):
    fake_gpus(monkeypatch, gpus)
    assert dist_.resolve_device(spec) == torch.device(want)


@pytest.mark.parametrize("spec, gpus, message", [
    ("cuda", 0, "no CUDA GPU is available"), ("cuda:0", 0, "no CUDA GPU is available"),
    ("cuda:7", 1, r"this machine has 1 GPU\(s\) \(cuda:0\)"), ("cuda:2", 2, r"cuda:0 to cuda:1"),
    ("gpu", 1, "not one of cpu, cuda, cuda:N or auto"), ("cuda:x", 1, "not one of"), ("cpu:0", 1, "not one of"),
    ("cuda:-1", 1, "not one of"), ("", 1, "not one of"), ("auto:0", 1, "not one of"), ("mps", 0, "not one of"),
])
def test_resolve_device_rejects_what_cannot_work(monkeypatch, no_torchrun, spec, gpus, message):
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(ToolchainError, match=message):
        dist_.resolve_device(spec)


def test_resolve_device_under_torchrun_is_one_gpu_per_process(monkeypatch):
    fake_torchrun(monkeypatch, rank=3, world=4, local=1, local_world=2)  # 2 nodes x 2 processes
    fake_gpus(monkeypatch, 2)
    assert dist_.resolve_device("cuda") == dist_.resolve_device("auto") == torch.device("cuda", 1)
    assert dist_.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ToolchainError, match="cuda:LOCAL_RANK; pass --device cuda"):
        dist_.resolve_device("cuda:0")
    fake_gpus(monkeypatch, 1)  # more processes on the node than GPUs: every rank fails, rank 0 too
    monkeypatch.setenv("LOCAL_RANK", "0")
    for spec in ("cuda", "auto"):
        with pytest.raises(ToolchainError, match=r"torchrun started 2 processes on this node but it has 1 GPU"):
            dist_.resolve_device(spec)
    assert dist_.resolve_device("cpu") == torch.device("cpu")
    fake_gpus(monkeypatch, 0)
    assert dist_.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("devices, backend", [
    (["cpu"], "gloo"), ("cpu", "gloo"), (["cpu", "cpu"], "gloo"), (["cuda:0"], "cpu:gloo,cuda:nccl"),
    ([torch.device("cuda", 3)], "cpu:gloo,cuda:nccl"), (["cpu", "cuda:1"], "cpu:gloo,cuda:nccl"),
])
def test_backend_for_device_list(devices, backend):
    assert dist_.backend_for(devices) == backend


def test_backend_for_unknown_device_type():
    with pytest.raises(ToolchainError, match="no distributed backend for device type 'meta'"):
        dist_.backend_for(["meta"])


@pytest.mark.parametrize("spec, gpus, backend, device", [
    ("auto", 1, "cpu:gloo,cuda:nccl", "cuda:0"), ("cuda", 2, "cpu:gloo,cuda:nccl", "cuda:0"),
    ("cpu", 2, "gloo", "cpu"), ("auto", 0, "gloo", "cpu"),
])
def test_init_from_env_joins_with_the_backend_of_its_device(monkeypatch, spec, gpus, backend, device):
    """What torchrun --nproc-per-node 1 does on a GPU machine: the group serves the device the model is on."""
    fake_torchrun(monkeypatch, world=1, local_world=1)
    fake_gpus(monkeypatch, gpus)
    calls = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", torch.device(d)))
    monkeypatch.setattr(dist_, "_device", None)
    assert dist_.init_from_env(device=spec) is True
    assert calls["backend"] == backend
    assert dist_._device == torch.device(device)
    assert calls.get("set_device") == (torch.device(device) if device != "cpu" else None)


def test_init_from_env_refuses_more_processes_than_gpus_before_joining(monkeypatch):
    fake_torchrun(monkeypatch, world=2, local_world=2)
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    with pytest.raises(ToolchainError, match="torchrun started 2 processes"):
        dist_.init_from_env(device="cuda")


# ----------------------------------------------------------------- the CLI: one line, exit 2, before any work
def _one_line(capsys, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    return err[0]


@pytest.mark.parametrize("command", ["compress", "train", "sensitivity"])
@pytest.mark.parametrize("device, gpus, fragment", [
    ("cuda", 0, "no CUDA GPU is available"), ("cuda:7", 1, "this machine has 1 GPU(s)"),
    ("gpu", 1, "not one of cpu, cuda, cuda:N or auto"),
])
def test_cli_bad_device(tmp_path, lenet300_path, capsys, monkeypatch, no_torchrun, command, device, gpus, fragment):
    fake_gpus(monkeypatch, gpus)
    out = tmp_path / "out.onnx"
    # The recipe / data do not exist either: the device error comes first, before any file is read.
    args = {"compress": ["compress", str(lenet300_path), "-r", str(tmp_path / "missing.toml"), "-o", str(out)],
            "train": ["train", "lenet-300-100", "-o", str(out), "--data", str(tmp_path / "missing")],
            "sensitivity": ["sensitivity", str(lenet300_path), "-o", str(out), "--data", str(tmp_path / "missing")]}
    assert main([*args[command], "--device", device]) == 2
    line = _one_line(capsys, fragment)
    assert line.startswith(f"toolchain {command}: error: device ")
    assert list(tmp_path.iterdir()) == []


def test_cli_torchrun_with_more_processes_than_gpus(tmp_path, lenet300_path, capsys, monkeypatch):
    fake_torchrun(monkeypatch, rank=1, world=2, local=1, local_world=2)
    fake_gpus(monkeypatch, 1)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group"))
    assert main(["compress", str(lenet300_path), "-r", str(tmp_path / "missing.toml"), "-o", str(tmp_path / "o.onnx"),
                 "--device", "cuda", "--distributed"]) == 2
    _one_line(capsys, "torchrun started 2 processes on this node but it has 1 GPU(s); use --nproc-per-node 1")


# ----------------------------------------------------------------- checkpoints across device kinds
@contextlib.contextmanager
def saved_as_if_on_gpu(monkeypatch):
    """torch.save records each storage's device as its location tag; tag them all cuda:0, as a CUDA run writes."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        yield


def _assert_gpu_tagged(path):
    if not HAS_CUDA:  # the file really names a GPU: loading it as saved needs CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=False)


class _Stop(Exception):
    pass


def _masked_lenet(density=0.5):
    torch.manual_seed(0)
    net = create_model("lenet-300-100")
    for name in ("ip1", "ip2", "ip3"):
        layer = masked_from_dense(getattr(net, name))
        layer.prune_(density_keep(layer.weight, layer.mask, density))
        setattr(net, name, layer)
    return net


CFG = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=4, augment_shift=1, lr_policy="cosine")


def _retrain(data, checkpoint=None, resume=False, stop_at=None, device=None, cfg=CFG):
    net = _masked_lenet()
    steps = [0]

    def after_step(m):
        steps[0] += 1
        if steps[0] == stop_at:
            raise _Stop

    try:
        train(net, data[0][:640], data[1][:640], cfg, TrainHooks(after_step=after_step), checkpoint=checkpoint,
              resume=resume, progress=False, device=device)
    except _Stop:
        return None
    return net


def _same(a: nn.Module, b: nn.Module, tol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k].cpu(), sb[k].cpu()
        if tol == 0 or x.dtype == torch.bool:
            assert torch.equal(x, y), k
        else:
            assert (x.double() - y.double()).abs().max() <= tol, k


def test_training_checkpoint_written_on_gpu_resumes_on_cpu(tmp_path, mnist_small, monkeypatch):
    ckpt = tmp_path / "retrain.ckpt"
    with saved_as_if_on_gpu(monkeypatch):
        assert _retrain(mnist_small, ckpt, stop_at=14) is None  # interrupted after the epoch-1 checkpoint (step 10)
    _assert_gpu_tagged(ckpt)
    state = load_checkpoint(ckpt)
    assert state["step"] == 10 and state["model"]["ip1.weight"].device.type == "cpu"
    assert state["optimizer"]["state"][0]["momentum_buffer"].device.type == "cpu"
    resumed = _retrain(mnist_small, ckpt, resume=True, device="cpu")
    _same(resumed, _retrain(mnist_small))


def test_compress_checkpoint_written_on_gpu_resumes_on_cpu(tmp_path, lenet300_path, mnist_small, monkeypatch):
    from converters import import_onnx

    recipe = parse_recipe(RECIPE)
    full = compress_mod.compress_network(import_onnx(lenet300_path), recipe, mnist_small, progress=False,
                                         device="cpu").net
    ckpt = tmp_path / "run.ckpt"
    real_train, calls = compress_mod.train, [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise _Stop
        return real_train(*a, **k)

    with saved_as_if_on_gpu(monkeypatch):
        monkeypatch.setattr(compress_mod, "train", interrupted)
        with pytest.raises(_Stop):
            compress_mod.compress_network(import_onnx(lenet300_path), recipe, mnist_small, checkpoint=ckpt,
                                          progress=False, device="cpu")
        monkeypatch.setattr(compress_mod, "train", real_train)
    _assert_gpu_tagged(ckpt)
    resumed = compress_mod.compress_network(import_onnx(lenet300_path), recipe, mnist_small, checkpoint=ckpt,
                                            resume=True, progress=False, device="auto" if not HAS_CUDA else "cpu")
    _same(resumed.net, full)


RECIPE = """
seed = 7
[[stage]]
pass = "prune"
rounds = 2
[stage.layers.default]
quality = 0.8
[stage.retrain]
epochs = 0.2
batch_size = 100
lr = 0.01
"""


def test_driver_keeps_the_network_on_its_device_and_applies_passes_on_the_host(lenet300_path, mnist_small,
                                                                                monkeypatch):
    """compress_network moves the network to the run device once, runs each pass's apply on the CPU and
    puts it back; simulated with a recorder of the devices each step saw."""
    from converters import import_onnx

    seen, real_train, real_on_host = [], compress_mod.train, compress_mod._on_host

    def spy_train(net, *a, device=None, **k):
        seen.append(("train", device, {p.device.type for p in net.parameters()}))
        return real_train(net, *a, device=device, **k)

    def spy_on_host(dev, net, model, fn, *args):
        def wrapped(n, *a):
            seen.append(("apply", None, {p.device.type for p in n.parameters()}))
            return fn(n, *a)
        real_on_host(dev, net, model, wrapped, *args)
        seen.append(("after", dev, {p.device.type for p in net.parameters()}))

    monkeypatch.setattr(compress_mod, "train", spy_train)
    monkeypatch.setattr(compress_mod, "_on_host", spy_on_host)
    res = compress_mod.compress_network(import_onnx(lenet300_path), parse_recipe(RECIPE), mnist_small,
                                        progress=False, device="cpu")
    assert [s[0] for s in seen] == ["apply", "after", "train", "apply", "after", "train", "apply", "after"]
    assert all(s[1] == torch.device("cpu") for s in seen if s[0] != "apply")
    assert all(s[2] == {"cpu"} for s in seen)
    assert res.error_after < 0.2


# ----------------------------------------------------------------- bf16 precision
def test_precision_key_is_validated():
    assert TrainConfig().precision == "fp32"
    assert TrainConfig(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', not 'fp16'"):
        TrainConfig(precision="fp16")
    recipe = parse_recipe(RECIPE + 'precision = "bf16"\n[stage.retrain_final]\nepochs = 1\n')
    assert recipe.stages[0].retrain.precision == recipe.stages[0].retrain_final.precision == "bf16"
    with pytest.raises(RecipeError, match=r"stage 1 \(prune\): retrain: precision must be one of .* not 'half'"):
        parse_recipe(RECIPE + 'precision = "half"\n')
    with pytest.raises(RecipeError, match="retrain_final: precision"):
        parse_recipe(RECIPE + '[stage.retrain_final]\nprecision = "fp64"\n')


def _masked_hashed_net():
    torch.manual_seed(1)
    ip1 = masked_from_dense(nn.Linear(784, 300))
    ip1.prune_(density_keep(ip1.weight, ip1.mask, 0.3))
    ip3 = masked_from_dense(nn.Linear(100, 10))
    ip3.prune_(density_keep(ip3.weight, ip3.mask, 0.5))
    return nn.Sequential(nn.Flatten(), ip1, nn.ReLU(), HashedLinear(300, 100, buckets=3000, seed=5), nn.ReLU(), ip3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_under_bf16_autocast_on_cpu(mnist_small, precision):
    """bf16: the linear layers compute in bfloat16; weights, gradients, masks and hash indices stay exact."""
    x, y, tx, ty = mnist_small
    net = _masked_hashed_net()
    masks = {i: net[i].mask.clone() for i in (1, 5)}
    index = net[3].hash_tables()[0].clone()
    out_dtypes, grad_dtypes = set(), set()

    def after_step(m):
        grad_dtypes.update(p.grad.dtype for p in m.parameters())

    before = evaluate(net, tx, ty)
    hooks = [net[i].register_forward_hook(lambda m, a, o: out_dtypes.add(o.dtype)) for i in (1, 3, 5)]
    cfg = TrainConfig(epochs=1, batch_size=25, lr=0.1, seed=0, precision=precision)
    train(net, x, y, cfg, TrainHooks(after_step=after_step), progress=False, device="cpu")
    for h in hooks:
        h.remove()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert out_dtypes == {want}
    assert grad_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    for i, m in masks.items():
        assert net[i].mask.dtype == torch.bool and torch.equal(net[i].mask, m)
        assert torch.all(net[i].weight[~m] == 0)
    idx_now = net[3].hash_tables()[0]
    assert idx_now.dtype == torch.int64 and torch.equal(idx_now, index)
    after = evaluate(net, tx, ty)  # evaluation stays fp32
    assert after < 0.3 < 0.5 < before


def test_bf16_changes_the_arithmetic_not_the_result(mnist_small):
    """The same seeded run in fp32 and bf16 ends at different weights (autocast is really on) but the same error to
    within a few points."""
    x, y, tx, ty = mnist_small
    runs = {}
    for precision in ("fp32", "bf16"):
        net = _masked_hashed_net()
        train(net, x, y, TrainConfig(epochs=1, batch_size=25, lr=0.1, seed=0, precision=precision), progress=False)
        runs[precision] = (net[1].weight.detach().clone(), evaluate(net, tx, ty))
    assert not torch.equal(runs["fp32"][0], runs["bf16"][0])
    assert abs(runs["fp32"][1] - runs["bf16"][1]) < 0.03


# ----------------------------------------------------------------- data loading
def test_default_workers_from_the_affinity_mask(monkeypatch):
    from toolchain.data import imagenet

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cpus, local_world, want in ((16, None, 15), (16, "4", 3), (128, None, 32), (1, None, 0), (3, "8", 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        if local_world:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        else:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert imagenet.default_workers() == want, (cpus, local_world)


@pytest.fixture
def tiny_imagenet(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, rgb in enumerate([(200, 10, 10), (10, 200, 10)]):
            d = tmp_path / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40 + 10 * i, 30), rgb).save(d / f"{i}.jpg")
    return tmp_path


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_loader_pins_batches_when_the_device_is_cuda(tiny_imagenet, monkeypatch, device, pinned):
    from toolchain.driver import load_training_data
    from toolchain.recipe import Recipe

    seen = []
    real = torch.utils.data.DataLoader

    def recording_loader(*a, **k):
        seen.append(k["pin_memory"])
        k["pin_memory"] = False  # no CUDA here to pin for
        return real(*a, **k)

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording_loader)
    tr, _, va, _ = load_training_data(Recipe("r", dataset="imagenet"), tiny_imagenet, input_shape=[1, 3, 16, 16],
                                      num_workers=0, device=device)
    assert tr.pin_memory is va.pin_memory is pinned
    xb, yb = next(tr.load([np.arange(4)]))
    assert xb.shape == (4, 3, 16, 16) and seen == [pinned]


# ----------------------------------------------------------------- on a GPU (tools/gpu_check.sh)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (tools/gpu_check.sh)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_training_keeps_model_and_optimizer_on_the_gpu(mnist_small, precision):
    x, y, tx, ty = mnist_small
    net = _masked_hashed_net().cuda()
    masks = {i: net[i].mask.clone() for i in (1, 5)}
    where = set()

    def after_step(m):
        where.update(p.device.type for p in m.parameters())
        where.update(p.grad.device.type for p in m.parameters())

    train(net, x, y, TrainConfig(epochs=1, batch_size=25, lr=0.1, seed=0, precision=precision),
          TrainHooks(after_step=after_step), progress=False)
    assert where == {"cuda"} and all(p.is_cuda for p in net.parameters())
    for i, m in masks.items():
        assert torch.equal(net[i].mask, m) and torch.all(net[i].weight[~m] == 0)
    assert evaluate(net, tx, ty) < 0.25


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (tools/gpu_check.sh)")
def test_gpu_checkpoints_resume_across_device_kinds(tmp_path, mnist_small):
    """Interrupted on the CPU, resumed on the GPU, and the other way round: both end where an uninterrupted run does
    (up to the devices' different rounding)."""
    ref = {d: _retrain(mnist_small, device=d) for d in ("cpu", "cuda")}
    for first, then in (("cpu", "cuda"), ("cuda", "cpu")):
        ckpt = tmp_path / f"{first}.ckpt"
        assert _retrain(mnist_small, ckpt, stop_at=14, device=first) is None
        resumed = _retrain(mnist_small, ckpt, resume=True, device=then)
        assert next(resumed.parameters()).device.type == "cpu"  # returned where it was
        _same(resumed, ref[first], tol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (tools/gpu_check.sh)")
def test_gpu_compress_driver_runs_on_the_gpu(lenet300_path, mnist_small, monkeypatch):
    from converters import import_onnx

    seen, real_train = [], compress_mod.train

    def spy_train(net, *a, **k):
        seen.append({p.device.type for p in net.parameters()} | {b.device.type for b in net.buffers()})
        return real_train(net, *a, **k)

    monkeypatch.setattr(compress_mod, "train", spy_train)
    recipe = parse_recipe(RECIPE + 'precision = "bf16"\n')
    res = compress_mod.compress_network(import_onnx(lenet300_path), recipe, mnist_small, progress=False, device="cuda")
    assert seen == [{"cuda"}, {"cuda"}]
    assert next(res.net.parameters()).device.type == "cpu"  # back where it came from, for export
    assert res.error_after < 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_worker(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    assert dist_.init_from_env(device="cuda")
    try:
        out = {"backend": str(dist.get_backend()), "device": str(dist_.device())}
        net = _masked_lenet().to(dist_.device())
        if rank == 1:
            net.ip2.prune_(torch.rand_like(net.ip2.weight) > 0.5)
        try:
            dist_.check_consistent(net)
            out["detected"] = False
        except ToolchainError:
            out["detected"] = True
        dist_.sync_module_state(net)  # the call that failed in the issue (NCCL-only group, model on the CPU)
        dist_.check_consistent(net)
        cpu_t = torch.full((3,), float(rank + 1))
        host = nn.Module()
        host.register_buffer("b", torch.full((2,), float(rank)))
        dist_.broadcast_module_buffers(host)  # a CPU buffer beside the GPU model: broadcast over gloo
        out["cpu_bcast"] = host.b.tolist()
        out["cpu_sum"] = dist_.all_reduce_sum(cpu_t).tolist()  # a CPU tensor: gloo
        out["gpu_sum"] = dist_.all_reduce_sum(cpu_t.cuda()).cpu().tolist()  # a GPU tensor: NCCL
        out["scalars"] = dist_.all_reduce_sum([rank, 0.5])
        dist_.barrier()
        from toolchain.data import load_mnist

        d = load_mnist()
        train(net, d.train_x[:2000], d.train_y[:2000], TrainConfig(epochs=1, batch_size=32, lr=0.1, seed=1,
                                                                    precision="bf16"), progress=False)
        out["state"] = {k: v.cpu() for k, v in net.state_dict().items()}
        out["error"] = evaluate(net, d.test_x[:1000], d.test_y[:1000])
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist_.cleanup()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (tools/gpu_check.sh)")
@pytest.mark.parametrize("world", [1, 2])
def test_gpu_process_group_collectives_on_each_device(tmp_path, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    ctx = mp.start_processes(_gpu_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1):
        assert time.monotonic() < deadline, "did not finish in 300 s"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, out in enumerate(ranks):
        assert out["backend"] == "cpu:gloo,cuda:nccl" and out["device"] == f"cuda:{r}"
        assert out["cpu_sum"] == out["gpu_sum"] == [world * (world + 1) / 2] * 3
        assert out["scalars"] == [world * (world - 1) // 2, 0.5 * world]
        assert out["detected"] == (world > 1) and out["cpu_bcast"] == [0.0, 0.0]
        assert out["error"] < 0.4
    for out in ranks[1:]:
        _same_state(out["state"], ranks[0]["state"])


def _same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_refuses_a_device_other_than_its_process_device(monkeypatch):
    from toolchain import train as train_mod

    monkeypatch.setattr(dist_, "is_distributed", lambda: True)
    monkeypatch.setattr(dist_, "_device", torch.device("cpu"))
    with pytest.raises(ToolchainError, match="is not this process's device cpu"):
        train_mod._run_device(nn.Linear(2, 2), torch.device("cuda", 0))
    assert train_mod._run_device(nn.Linear(2, 2), torch.device("cpu")) == torch.device("cpu")


def test_python_api_compress_takes_a_device(monkeypatch, mnist_small, lenet300_path, no_torchrun):
    import toolchain

    fake_gpus(monkeypatch, 0)
    model = toolchain.load(lenet300_path)
    recipe = {"stage": [{"pass": "prune", "rounds": 1, "layers": {"default": {"density": 0.5}},
                         "retrain": {"epochs": 0.05, "batch_size": 100, "lr": 0.01}}]}
    with pytest.raises(ToolchainError, match="no CUDA GPU is available"):
        toolchain.compress(model, recipe, data=mnist_small, device="cuda", progress=False)
    res = toolchain.compress(model, recipe, data=mnist_small, device="cpu", progress=False)
    assert res.error_after < 0.1 and next(res.network.parameters()).device.type == "cpu"
