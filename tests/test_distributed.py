"""Data-parallel retraining on 2 CPU processes (gloo): the ranks agree with each other, the result
matches one process with the same global batch, and checkpoints resume on a different process count.

The 2-process runs are launched with torchrun (this file is the script) and torch.multiprocessing.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from toolchain import distributed as dist_
from toolchain.errors import ToolchainError
from toolchain.methods.prune.layers import masked_from_dense
from toolchain.methods.prune.passes import density_keep
from toolchain.train import TrainConfig, TrainHooks, evaluate, train
from toolchain.zoo import create_model

N_TRAIN = 1999  # 32 global batches of 64 per epoch, the last one 15 samples: split 7 / 8 over 2 ranks
LAYERS = ("ip1", "ip2", "ip3")
TOL = 1e-5


def _data():
    from toolchain.data import load_mnist

    d = load_mnist()
    return d.train_x[:N_TRAIN], d.train_y[:N_TRAIN], d.test_x[:1000], d.test_y[:1000]


def _masked_lenet(density: float = 0.5) -> nn.Module:
    """LeNet-300-100 with masked layers, pruned once to `density` (on the seeded initial weights)."""
    torch.manual_seed(0)
    net = create_model("lenet-300-100")
    for name in LAYERS:
        setattr(net, name, masked_from_dense(getattr(net, name)))
    prune(net, density)
    return net


def prune(net: nn.Module, density: float) -> None:
    for name in LAYERS:
        layer = getattr(net, name)
        layer.prune_(density_keep(layer.weight, layer.mask, density))


class _Stop(Exception):
    """Simulates an interruption (e.g. a killed job) in the middle of training."""


RETRAIN = TrainConfig(epochs=2, batch_size=64, lr=0.05, seed=2, augment_shift=1, l1=1e-5, lr_policy="cosine")


def retrain(checkpoint=None, resume=False, stop_at: int | None = None) -> nn.Module:
    """The scenario compared across process counts: prune, then retrain 64 steps (shifts, L1, masks)."""
    x, y, _, _ = _data()
    net = _masked_lenet()
    done = [0]

    def after_step(m):
        for name in LAYERS:  # what prune passes do after each step: keep pruned weights at zero
            with torch.no_grad():
                getattr(m, name).weight.mul_(getattr(m, name).mask)
        done[0] += 1
        if done[0] == stop_at:
            raise _Stop

    try:
        train(net, x, y, RETRAIN, TrainHooks(after_step=after_step), checkpoint=checkpoint, resume=resume,
              progress=False)
    except _Stop:
        return None
    return net


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------- what each process runs
def scenarios(names: list[str], outdir: Path) -> None:
    """Join the process group, run each named scenario, save each one's results per rank."""
    torch.set_num_threads(1)
    assert dist_.init_from_env(device="cpu"), "not launched as a process group"  # gloo, also on a GPU machine
    try:
        for name in names:
            torch.save(scenario(name, outdir), outdir / f"{name}-rank{dist_.rank()}.pt")
    finally:
        dist_.cleanup()


def scenario(name: str, outdir: Path) -> dict:
    r, w = dist_.rank(), dist_.world_size()
    out: dict = {"world": w}
    if name == "train":
        net = retrain()
        out["after_retrain"] = state(net)
        _, _, tx, ty = _data()
        out["error"] = evaluate(net, tx, ty, batch_size=300)
        # A prune step on the retrained (DDP-synchronised) weights, then more retraining.
        prune(net, 0.2)
        out["masks_after_prune"] = {n: getattr(net, n).mask.clone() for n in LAYERS}
        x, y, _, _ = _data()
        train(net, x, y, TrainConfig(epochs=0.5, batch_size=64, lr=0.01, seed=5), progress=False)
        out["after_second_round"] = state(net)
    elif name == "resume":
        ckpt = outdir / "retrain.ckpt"
        assert retrain(ckpt, stop_at=40) is None  # interrupted after the epoch-1 checkpoint (step 32)
        dist_.barrier()
        out["ckpt_step"] = torch.load(ckpt, weights_only=False)["step"]
    elif name == "sync":
        net = _masked_lenet()
        if r == 1:  # make rank 1 diverge: a different mask and weights
            net.ip2.prune_(torch.rand_like(net.ip2.weight) > 0.5)
        try:
            dist_.check_consistent(net)
            out["detected"] = False
        except ToolchainError as e:
            out["detected"] = "differs between processes" in str(e)
        dist_.sync_module_state(net)
        dist_.check_consistent(net)  # raises if the broadcast left a difference
        out["state"] = state(net)
        out["sum"] = dist_.all_reduce_sum([r + 1, 0.5])
        out["bounds"] = dist_.shard_bounds(15)
    elif name in ("compress", "compress-stop"):
        from toolchain import driver

        calls, real_train = [0], driver.train

        def train_then_stop(*a, **k):
            calls[0] += 1
            if calls[0] == 2:  # interrupt the second round's retraining
                raise _Stop
            return real_train(*a, **k)

        if name == "compress-stop":
            driver.train = train_then_stop
        try:
            res = run_compress(outdir / f"{name}.ckpt")
            out["state"] = state(res.net)
            out["errors"] = (res.error_before, res.error_after)
        except _Stop:
            out["stopped"] = True
        finally:
            driver.train = real_train
        dist_.barrier()
    return out


PRUNE_RECIPE = """
seed = 3
[[stage]]
pass = "prune"
rounds = 2
remove_dead_neurons = false
[stage.layers.ip1]
density = 0.3
[stage.layers.ip2]
density = 0.5
[stage.layers.ip3]
density = 0.6
[stage.retrain]
epochs = 0.5
batch_size = 64
lr = 0.01
lr_policy = "fixed"
"""


def _graph_lenet():
    """LeNet-300-100 as the compress driver's graph IR (what converters.import_onnx returns)."""
    from converters.ir import Network, Node

    torch.manual_seed(0)
    seq = create_model("lenet-300-100")
    ops = {"flatten": "Flatten", "ip1": "Gemm", "relu1": "Relu", "ip2": "Gemm", "relu2": "Relu", "ip3": "Gemm"}
    nodes, value = [], "data"
    for name, op in ops.items():
        nodes.append(Node(name, op, [value], [f"{name}_out"]))
        value = f"{name}_out"
    return Network(nodes, dict(seq.named_children()), {}, ["data"], [value], {"data": ["N", 1, 28, 28]})


def run_compress(checkpoint, resume=False):
    from toolchain.driver import compress_network
    from toolchain.recipe import parse_recipe

    x, y, tx, ty = _data()
    return compress_network(_graph_lenet(), parse_recipe(PRUNE_RECIPE), (x, y, tx, ty), checkpoint=checkpoint,
                            resume=resume, progress=False)


def _spawned(rank: int, world: int, port: int, names: list[str], outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    scenarios(names, Path(outdir))


# ----------------------------------------------------------------- launchers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(names, outdir: Path, world: int) -> dict[str, list[dict]]:
    return {n: [torch.load(outdir / f"{n}-rank{r}.pt", weights_only=False) for r in range(world)] for n in names}


def spawn(names: list[str], outdir: Path, world: int = 2, timeout: float = 180) -> dict[str, list[dict]]:
    """Run scenarios on `world` processes started by torch.multiprocessing; {name: [rank 0's, rank 1's, ...]}."""
    ctx = mp.start_processes(_spawned, args=(world, _free_port(), names, str(outdir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process run of {names} did not finish in {timeout} s")
    return _results(names, outdir, world)


def torchrun(names: list[str], outdir: Path, world: int = 2, timeout: float = 180) -> dict[str, list[dict]]:
    """Run scenarios on `world` processes launched by torchrun (this file as the script)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           __file__, str(outdir), *names]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return _results(names, outdir, world)


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    """One torchrun launch and one torch.multiprocessing launch serve every 2-process test here."""
    out = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp_:
        if os.environ.get("CI"):  # as conftest does for each test: no MNIST cache in the user's home
            mp_.setenv("TOOLCHAIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        res = torchrun(["train"], out)
        res.update(spawn(["sync", "resume", "compress", "compress-stop"], out))
    return out, res


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels (and summation order) as the 1-thread workers
    yield
    torch.set_num_threads(n)


def assert_same(a: dict, b: dict, tol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype == torch.bool or tol == 0:
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            diff = (a[k].double() - b[k].double()).abs().max().item()
            assert diff <= tol, f"{k}: max difference {diff:.2e} > {tol}"


# ----------------------------------------------------------------- tests
def test_not_launched_is_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_.init_from_env() is False
    assert (dist_.rank(), dist_.world_size(), dist_.is_main(), dist_.is_distributed()) == (0, 1, True, False)
    assert dist_.device() == torch.device("cpu")
    assert dist_.all_reduce_sum([3, 1.5]) == [3, 1.5]
    net = nn.Linear(2, 2)
    assert dist_.wrap_ddp(net) is net
    dist_.barrier(), dist_.check_consistent(net), dist_.sync_module_state(net)  # no-ops


def test_init_without_master_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ToolchainError, match="MASTER_ADDR"):
        dist_.init_from_env()


def test_shard_bounds_cover_every_sample_once():
    for n in (0, 1, 7, 64, 1999):
        for world in (1, 2, 3, 8):
            parts = [dist_.shard_bounds(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(h - l for l, h in parts) - min(h - l for l, h in parts) <= 1


def test_two_processes_match_one_process(two_proc, one_thread):
    ranks = two_proc[1]["train"]
    assert [r["world"] for r in ranks] == [2, 2]
    # The ranks hold bit-identical weights and masks after retraining, after a prune step, and after more retraining.
    for key in ("after_retrain", "masks_after_prune", "after_second_round"):
        assert_same(ranks[0][key], ranks[1][key])
    assert ranks[0]["error"] == ranks[1]["error"]
    # ... and match one process with the same global batch.
    single = retrain()
    assert_same(state(single), ranks[0]["after_retrain"], TOL)
    for name in LAYERS:  # pruning and retraining did happen
        m = getattr(single, name).mask
        assert 0.45 < m.float().mean() < 0.55
        assert torch.all(getattr(single, name).weight[~m] == 0)
    assert not torch.equal(state(single)["ip1.weight"], state(_masked_lenet())["ip1.weight"])
    _, _, tx, ty = _data()
    assert abs(evaluate(single, tx, ty) - ranks[0]["error"]) <= 0.002
    assert 0.0 < ranks[0]["error"] < 0.5


def test_resume_on_fewer_processes_matches_uninterrupted_run(two_proc, one_thread):
    out, res = two_proc
    assert res["resume"][0]["ckpt_step"] == 32  # global batches done when the 2-process run was interrupted
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())  # written atomically
    resumed = retrain(out / "retrain.ckpt", resume=True)  # 1 process
    assert_same(state(resumed), state(retrain()), TOL)


def test_sync_detects_and_repairs_diverged_ranks(two_proc):
    ranks = two_proc[1]["sync"]
    assert ranks[0]["detected"] and ranks[1]["detected"]
    assert_same(ranks[0]["state"], ranks[1]["state"])
    assert_same(ranks[0]["state"], state(_masked_lenet()))  # rank 0's state won
    assert ranks[0]["sum"] == ranks[1]["sum"] == [3, 1.0]
    assert [r["bounds"] for r in ranks] == [(0, 7), (7, 15)]


def test_compress_driver_distributed_and_resumed_on_one_process(two_proc, one_thread):
    out, res = two_proc
    full = res["compress"]
    assert_same(full[0]["state"], full[1]["state"])
    assert full[0]["errors"] == full[1]["errors"]
    assert all(r.get("stopped") for r in res["compress-stop"])
    ckpt = torch.load(out / "compress-stop.ckpt", weights_only=False)
    assert tuple(ckpt["done"]) == (0, 0)  # round 1 finished on 2 processes
    resumed = run_compress(out / "compress-stop.ckpt", resume=True)  # rounds 2.. on 1 process
    assert_same(state(resumed.net), full[0]["state"], TOL)
    assert abs(resumed.net.layers()["ip1"].density() - 0.3) < 1e-3


if __name__ == "__main__":  # torchrun entry point: python -m torch.distributed.run ... test_distributed.py DIR NAME...
    scenarios(sys.argv[2:], Path(sys.argv[1]))
