#!/usr/bin/env python3
"""Set-up and entry points with nothing but Python 3 and pip.

    python3 dev.py run     # create .venv, install everything, run `odelora reproduce --quick`
    python3 dev.py test    # same set-up, then the test suite
    python3 dev.py setup   # only the set-up

torch is installed first, pinned to the version in constraints.txt, and every later install
passes that constraints file, so no other torch build is ever pulled in.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".odelora-installed"


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist() -> None:
    """The Debian package with Fashion-MNIST (for the vision experiments): installed when running
    as root on a system with apt-get; otherwise say how."""
    if FASHION_MNIST.is_dir() or os.environ.get("ODELORA_FASHION_MNIST"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        if subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], cwd=ROOT).returncode == 0:
            return
    print("note: the vision experiments need Fashion-MNIST: run `sudo apt-get install dataset-fashion-mnist` "
          "(Debian/Ubuntu), or set ODELORA_FASHION_MNIST to a folder with the four *-idx*-ubyte.gz files", flush=True)


def setup() -> None:
    fashion_mnist()
    files = [ROOT / "pyproject.toml", ROOT / "constraints.txt"]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    print("dev.py: installing torch and the project into .venv (first run only: a few minutes)", flush=True)
    if not PY.exists():
        sh(sys.executable, "-m", "venv", str(VENV))
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    torch_pin = next(l.strip() for l in (ROOT / "constraints.txt").read_text().splitlines() if l.startswith("torch"))
    sh(*pip, torch_pin)
    sh(*pip, "-c", "constraints.txt", "-e", ".[all,dev]")
    STAMP.write_text(digest)


def main() -> int:
    task = sys.argv[1] if len(sys.argv) > 1 else "help"
    extra = sys.argv[2:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DDE_BACKEND="pytorch")
    if task == "setup":
        setup()
        return 0
    if task == "run":
        setup()
        return subprocess.call([str(VENV / "bin" / "odelora"), "reproduce", "--quick", *extra], cwd=ROOT, env=env)
    if task == "test":
        setup()
        return subprocess.call([str(PY), "-m", "pytest", "-q", *extra], cwd=ROOT, env=env)
    if task not in ("help", "-h", "--help"):
        print(f"dev.py: unknown task {task!r}; the tasks are run, test and setup", file=sys.stderr)
        return 2
    print(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
