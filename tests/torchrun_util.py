"""Launch a worker under ``torchrun --standalone`` (gloo) from a test, robust to stalls: output
goes to a file (a stray worker cannot block a pipe), a stalled run is killed with its whole
process tree and retried once."""

import os
import subprocess
import sys
from pathlib import Path


def _kill_tree(pid: int) -> None:
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


def torchrun(script: Path, args: list[str], log: Path, nproc: int = 2, timeout: float = 180) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script), *args]
    for attempt in range(2):
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                if attempt == 1:
                    raise AssertionError(f"torchrun stalled twice:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, log.read_text()[-3000:]
