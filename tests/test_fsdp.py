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


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(method, tmp_path):
    """The ranks agree to skip a step with a NaN in one rank's batch; only the ranks that saw it
    then say what it was, and that must not communicate: the rank whose loss was NaN said so
    directly while the other gathered its NaN gradients again, alone, and gloo aborted the job.
    Now the job goes on: the same factors as one process that leaves that step out."""
    torchrun(WORKER, [str(tmp_path / "out.pt"), "nanrank", method], tmp_path / "log.txt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["skipped"] == 1
    assert worst(got["params"], reference(method, steps=[k for k in range(fsdp_worker.STEPS) if k != 2])) < 1e-6


def test_fsdp1_is_refused_with_what_to_use():
    """FSDP1 flattens parameters (with ``use_orig_params=True``, which a frozen base needs, the
    factors are 1-D views of flat shards): the error names FSDP2 and DDP, not missing LoRA pairs."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.pt"
        torchrun(WORKER, [str(out), "fsdp1", "euler"], Path(tmp) / "log.txt", nproc=1)
        error = torch.load(out, weights_only=True)["error"]
    assert error.startswith("NotImplementedError: the model is wrapped in FSDP1") and "Use FSDP2" in error and "DDP" in error, error


@pytest.mark.parametrize("shape", [(6, 2, 5), (256, 4, 192)])
def test_single_process_checkpoint_round_trip_is_exact_and_quiet(shape, tmp_path):
    """``save_checkpoint``/``load_checkpoint`` without a process group: the steps after loading
    equal those of the optimizer that saved, bit for bit, and DCP's one-process notice is not
    shown. DCP hands tensors back contiguous, while the cached frames are transposed views, and a
    matrix product's rounding depends on its operands' layout (wide layers showed it: 7e-8 apart
    in float32 after the load, before the frames were restored to their saved layout)."""
    import warnings

    from odelora import ODELoRA
    from odelora.integrations.distributed import load_checkpoint, save_checkpoint

    m_, r, n = shape
    Y = torch.randn(m_, n, generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        m = torch.nn.Module()
        m.B, m.A = torch.nn.Parameter(torch.randn(m_, r) / r**0.5), torch.nn.Parameter(torch.randn(r, n) / n**0.5)
        return m, ODELoRA([(m.B, m.A)], lr=0.01, method="rk4")

    def step(m, opt):
        def closure():
            opt.zero_grad()
            loss = (m.B @ m.A - Y).square().sum()
            loss.backward()
            return loss

        opt.step(closure)

    m, opt = build()
    step(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_checkpoint(tmp_path / "c", m, opt)
        m2, opt2 = build()
        load_checkpoint(tmp_path / "c", m2, opt2)
    for _ in range(3):
        step(m, opt)
        step(m2, opt2)
    assert torch.equal(m.B, m2.B) and torch.equal(m.A, m2.A)


def test_a_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    """Another LoRA rank or layer shape, or another optimizer configuration: a ValueError that
    says what differs, and the model and the optimizer stay as they were."""
    from odelora import ODELoRA
    from odelora.integrations.distributed import load_checkpoint, save_checkpoint

    def build(m_=12, r=3, seed=0, **kw):
        g = torch.Generator().manual_seed(seed)
        m = torch.nn.Module()
        m.B, m.A = torch.nn.Parameter(torch.randn(m_, r, generator=g)), torch.nn.Parameter(torch.randn(r, 9, generator=g))
        opt = ODELoRA([(m.B, m.A)], lr=0.05, **kw)
        opt.zero_grad()
        (m.B @ m.A - 1).square().sum().backward()
        opt.step()
        return m, opt

    save_checkpoint(tmp_path / "c", *build())
    for kw, match in ((dict(r=2), r"B \(12, 3\) saved, \(12, 2\) here; A \(3, 9\) saved, \(2, 9\) here"),
                      (dict(m_=10), r"B \(12, 3\) saved, \(10, 3\) here"),
                      (dict(preconditioner="adam"), "preconditioner")):
        m, opt = build(seed=1, **kw)
        before, state = [p.detach().clone() for p in (m.B, m.A)], repr(opt.state_dict())
        with pytest.raises(ValueError, match=match):
            load_checkpoint(tmp_path / "c", m, opt)
        assert torch.equal(m.B, before[0]) and torch.equal(m.A, before[1]) and repr(opt.state_dict()) == state


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
    assert torch.equal(m2.B, m.B) and torch.equal(m2.A, m.A) and opt2.stats.steps == 2


def test_the_trainers_loss_count_question_is_asked_in_step_across_fsdp2_ranks(tmp_path):
    """Rank 0's first micro-batch cannot answer (every label masked), rank 1's can: both ask two
    micro-batches and agree, where asking until each could tell hung in FSDP's gathers."""
    import json

    torchrun(Path(__file__).parent / "trainer_probe_worker.py", [str(tmp_path / "out")], tmp_path / "log.txt", timeout=150)
    got = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert got == [dict(answer=True, asked=2)] * 2, got
