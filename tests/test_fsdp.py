"""ODELoRA under FSDP2 (``fully_shard``, DTensor factors; torchrun, gloo): the same factors as one
process on the global batch, and bit-identical resume from distributed checkpoints."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("torch.distributed.fsdp")
sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402
from torchrun_util import torchrun  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: processes, trainings, reports

WORKER = Path(__file__).parent / "fsdp_worker.py"


def reference(method, steps=range(fsdp_worker.STEPS), narrow=False):
    model = fsdp_worker.build(narrow)
    opt = fsdp_worker.optimizer(model, method)
    X, Y = fsdp_worker.batches()
    fsdp_worker.train(model, opt, X, Y, steps)
    return fsdp_worker.full_params(model)


def worst(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("mode,method", [("train", "euler"), ("train", "rk4"), ("train", "bs32"), ("train", "adam"), ("custom", "rk4"),
                                         ("narrow", "rk4"), ("narrow", "dopri5")])
def test_fsdp2_matches_single_process(mode, method, tmp_path):
    """``narrow``: gradients of rank 2 < r in one layer, where products have rank below r and
    nothing may depend on rounding (multi-stage steps ended 1e-2 apart in the factors before)."""
    torchrun(WORKER, [str(tmp_path / "out.pt"), mode, method], tmp_path / "log.txt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)["params"]
    ref = reference(method, narrow=mode == "narrow")
    moved = worst(ref, fsdp_worker.full_params(fsdp_worker.build(mode == "narrow")))
    assert worst(got, ref) < 1e-6 and moved > 1e-3, (worst(got, ref), moved)


@pytest.mark.parametrize("method", ["rk4", "adam"])
def test_fsdp2_checkpoint_resume_is_bit_identical_and_reshards(method, tmp_path):
    ckpt = tmp_path / "ckpt"
    torchrun(WORKER, [str(tmp_path / "out.pt"), "resume", method, str(ckpt)], tmp_path / "log.txt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert worst(got["continued"], got["resumed"]) == 0.0
    # the two-rank checkpoint resumed on one rank: same steps, up to the order of the reductions
    torchrun(WORKER, [str(tmp_path / "one.pt"), "load", method, str(ckpt)], tmp_path / "log1.txt", nproc=1)
    one = torch.load(tmp_path / "one.pt", weights_only=True)["params"]
    assert worst(one, got["continued"]) < 1e-10


def test_single_process_checkpoint_round_trip_is_exact_and_quiet(tmp_path):
    """``save_checkpoint``/``load_checkpoint`` without a process group: the next step after loading
    equals the next step of the optimizer that saved, and DCP's one-process notice is not shown."""
    import warnings

    from odelora import ODELoRA
    from odelora.integrations.distributed import load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.B, m.A = torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(2, 5))
        return m, ODELoRA([(m.B, m.A)], lr=0.1)

    def step(m, opt):
        opt.zero_grad()
        (m.B @ m.A - 1).square().sum().backward()
        opt.step()

    m, opt = build()
    step(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint(tmp_path / "c", m, opt)
        m2, opt2 = build()
        load_checkpoint(tmp_path / "c", m2, opt2)
    step(m, opt)
    step(m2, opt2)
    assert torch.equal(m.B, m2.B) and torch.equal(m.A, m2.A)


def test_checkpoint_of_a_ddp_model_loads_into_the_bare_model(tmp_path):
    """Parameter names are saved without DDP's ``module.`` prefix: a checkpoint written from a
    DDP-wrapped model resumes on one process without DDP (and the next steps agree)."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from odelora import ODELoRA
    from odelora.integrations.distributed import load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.B, m.A = torch.nn.Parameter(torch.randn(6, 2)), torch.nn.Parameter(torch.randn(2, 5))
        m.forward = lambda: (m.B @ m.A - 1).square().sum()
        return m

    def step(model, opt):
        opt.zero_grad()
        model().backward()
        opt.step()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        m = build()
        ddp = DistributedDataParallel(m)
        opt = ODELoRA([(m.B, m.A)], lr=0.1)
        step(ddp, opt)
        save_checkpoint(tmp_path / "c", ddp, opt)
    finally:
        dist.destroy_process_group()
    m2 = build()
    opt2 = ODELoRA([(m2.B, m2.A)], lr=0.1)
    load_checkpoint(tmp_path / "c", m2, opt2)
    assert torch.equal(m2.B, m.B) and torch.equal(m2.A, m.A)
    step(m, opt)
    step(m2, opt2)
    assert torch.equal(m2.B, m.B) and torch.equal(m2.A, m.A) and opt2.stats["steps"] == 2
