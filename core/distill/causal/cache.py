"""The teacher's top-k logits per token, computed once per (teacher, dataset, max_length, k).

Stored as DistillKit stores its offline logits, in a folder named by the key:
``values.f16`` (N, L, k) float16 logits, ``indices`` (N, L, k) uint16 token ids (int32 for
vocabularies over 65 536), ``lse.f32`` (N, L) the logsumexp of the full logits (so the rest of
the vocabulary keeps its mass), and ``meta.json`` written last: a folder without it is an
unfinished build and is ignored. k = 64 over a vocabulary under 65 536 is 260 bytes per token.
The arrays are memory-mapped: a batch reads only its rows.

The folder lives under a cache directory that every job of the tenant on a worker machine sees
(``DISTILL_LM_CACHE_DIR``); a second job on the same pair reads it and never runs the teacher.
The worker shares the finished folders with its other machines through storage
(worker/teacher_cache.py): it brings them before the job and stores them after it, both by
whole folders with ``meta.json`` last, so the rule above holds on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.distill.methods.token_losses import TeacherTokens

CACHE_ENV = "DISTILL_LM_CACHE_DIR"
BUILD_BATCH = 8


def cache_key(teacher_sha256: str, dataset_sha256: str, max_length: int, k: int) -> str:
    return f"{teacher_sha256[:24]}-{dataset_sha256[:24]}-L{max_length}-k{k}"


def cache_root(default: Path) -> Path:
    """The shared cache directory of this machine, else ``default`` (the job's own)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else default


@dataclass
class TopKCache:
    folder: Path
    values: np.ndarray
    indices: np.ndarray
    lse: np.ndarray
    meta: dict[str, Any]

    @property
    def bytes_per_token(self) -> float:
        n, length = self.lse.shape
        total = self.values.nbytes + self.indices.nbytes + self.lse.nbytes
        return total / max(n * length, 1)

    def batch(self, rows: Tensor, device: torch.device) -> TeacherTokens:
        idx = np.sort(rows.cpu().numpy())  # memory-mapped reads in file order
        order = torch.as_tensor(np.argsort(np.argsort(rows.cpu().numpy())))
        return TeacherTokens(
            values=torch.from_numpy(np.asarray(self.values[idx]))[order].to(device),
            indices=torch.from_numpy(np.asarray(self.indices[idx]).astype(np.int64))[order].to(
                device
            ),
            lse=torch.from_numpy(np.asarray(self.lse[idx]))[order].to(device),
        )


def open_cache(folder: Path) -> TopKCache | None:
    """The finished cache in ``folder``, or None."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    n, length, k = meta["rows"], meta["length"], meta["k"]
    return TopKCache(
        folder,
        np.memmap(folder / "values.f16", np.float16, "r", shape=(n, length, k)),
        np.memmap(folder / "indices", np.dtype(meta["index_dtype"]), "r", shape=(n, length, k)),
        np.memmap(folder / "lse.f32", np.float32, "r", shape=(n, length)),
        meta,
    )


@torch.no_grad()
def build_cache(
    folder: Path,
    logits_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    k: int,
    *,
    key: str,
    device: torch.device,
) -> TopKCache:
    """Run the teacher over ``x`` once and write its top-k into ``folder`` (atomically: built
    in a sibling folder and renamed; a concurrent builder's finished folder wins)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    n, _, length = x.shape
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        vocab = None
        values = indices = lse = None
        for start in range(0, n, BUILD_BATCH):
            logits = logits_fn(x[start : start + BUILD_BATCH].to(device)).float()
            if vocab is None:
                vocab = logits.shape[-1]
                k = min(k, vocab)
                index_dtype = np.uint16 if vocab <= 65536 else np.int32
                values = np.memmap(work / "values.f16", np.float16, "w+", shape=(n, length, k))
                indices = np.memmap(work / "indices", index_dtype, "w+", shape=(n, length, k))
                lse = np.memmap(work / "lse.f32", np.float32, "w+", shape=(n, length))
            assert values is not None and indices is not None and lse is not None
            top = logits.topk(k, dim=-1)
            end = start + len(logits)
            values[start:end] = top.values.cpu().numpy().astype(np.float16)
            indices[start:end] = top.indices.cpu().numpy().astype(indices.dtype)
            lse[start:end] = torch.logsumexp(logits, -1).cpu().numpy()
        assert values is not None and indices is not None and lse is not None
        for arr in (values, indices, lse):
            arr.flush()
        meta = {
            "key": key,
            "rows": n,
            "length": length,
            "k": k,
            "vocab_size": vocab,
            "index_dtype": np.dtype(indices.dtype).name,
            "seconds": round(time.monotonic() - started, 3),
        }
        (work / "meta.json").write_text(json.dumps(meta))
        try:
            work.rename(folder)
        except OSError:  # another job finished the same key first
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    cache = open_cache(folder)
    assert cache is not None
    return cache
