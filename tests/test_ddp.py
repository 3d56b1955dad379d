"""ODELoRA under DDP (torchrun, 2 processes, gloo) equals one process on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402


def _kill_tree(pid: int) -> None:
    """Kill torchrun and every worker it started (workers may sit in their own process groups)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_ddp_matches_single_process(method, tmp_path):
    steps = 5
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "ddp_worker.py"), str(out), method, str(steps)]
    log = tmp_path / "torchrun.log"
    for attempt in range(2):  # one retry if a run stalls
        with open(log, "w") as fh:  # a file, not a pipe: a stray worker cannot block the reader
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=120)
                break
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                if attempt == 1:
                    raise AssertionError(f"torchrun stalled twice:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, log.read_text()[-3000:]
    ddp = torch.load(out, weights_only=True)
    model = ddp_worker.build()
    X, Y = ddp_worker.batches(steps)
    ref = ddp_worker.train(model, model, X, Y, method)
    assert ddp.keys() == ref.keys()
    worst = max(float((ddp[k] - ref[k]).abs().max()) for k in ref)
    moved = max(float((ref[k] - v.detach()).abs().max()) for k, v in ddp_worker.build().named_parameters())
    assert worst < 1e-6 and moved > 1e-3, (worst, moved)
