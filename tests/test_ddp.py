"""ODELoRA under DDP (torchrun, 2 processes, gloo) equals one process on the same global batch."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_ddp_matches_single_process(method, tmp_path):
    steps = 5
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "ddp_worker.py"), str(out), method, str(steps)]
    for attempt in range(2):  # one retry: a rendezvous on a loaded 2-core machine can stall
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            out_text, err_text = proc.communicate(timeout=120)
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
            out_text, err_text = proc.communicate()
            if attempt == 1:
                raise AssertionError(f"torchrun timed out twice:\n{out_text[-3000:]}\n{err_text[-3000:]}") from None
    assert proc.returncode == 0, out_text[-3000:] + err_text[-3000:]
    ddp = torch.load(out, weights_only=True)
    model = ddp_worker.build()
    X, Y = ddp_worker.batches(steps)
    ref = ddp_worker.train(model, model, X, Y, method)
    assert ddp.keys() == ref.keys()
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    moved = max(float((ref[k] - v.detach()).abs().max()) for k, v in ddp_worker.build().named_parameters())
    assert worst < 1e-6 and moved > 1e-3, (worst, moved)
