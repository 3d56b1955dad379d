"""ODELoRA under DDP (torchrun, 2 processes, gloo) equals one process on the same global batch."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402
from torchrun_util import torchrun  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: processes, trainings, reports


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_ddp_matches_single_process(method, tmp_path):
    steps = 5
    out = tmp_path / "ddp.pt"
    torchrun(Path(__file__).parent / "ddp_worker.py", [str(out), method, str(steps)], tmp_path / "torchrun.log")
    ddp = torch.load(out, weights_only=True)
    model = ddp_worker.build()
    X, Y = ddp_worker.batches(steps)
    ref = ddp_worker.train(model, model, X, Y, method)
    assert ddp.keys() == ref.keys()
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    moved = max(float((ref[k] - v.detach()).abs().max()) for k, v in ddp_worker.build().named_parameters())
    assert worst < 1e-6 and moved > 1e-3, (worst, moved)
    assert "differ between the 2 processes" not in (tmp_path / "torchrun.log").read_text()


def test_ranks_of_a_model_not_wrapped_in_ddp_are_warned_about(tmp_path):
    """Each rank trains on its half of the batch without DDP: the first step says so, once per rank."""
    torchrun(Path(__file__).parent / "ddp_worker.py", [str(tmp_path / "ddp.pt"), "euler", "2", "nowrap"], tmp_path / "torchrun.log")
    log = (tmp_path / "torchrun.log").read_text()
    assert log.count("differ between the 2 processes") == 2 and "wrap the model in DistributedDataParallel" in log, log[-2000:]
