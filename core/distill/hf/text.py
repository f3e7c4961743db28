"""Text transfer sets for ``hf`` teachers: ``.jsonl`` lines encoded by the teacher's tokenizer.

A line is ``{"text": …, "label": …}``: the label an int, or a name of the teacher's ``id2label``
(mapped through its ``label2id``, not sorted as for other teachers); ``-1``, ``null`` or absent
is unlabeled; ``"split": "val"`` puts a line in the validation split (when any line has it, the
split is given rather than carved). Texts are tokenised when the job runs, with
``training.max_length`` tokens at most, padded to the longest text of the set (one sequence
length for every row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.distill.data import _Arrays, _to_transfer_set
from core.distill.hf.models import encode
from core.distill.jsonl import is_validation, json_objects
from core.distill.types import TransferSet
from core.errors import DatasetInvalid

ENCODE_CHUNK = 4096  # texts per tokenizer call


def read_jsonl(path: Path) -> tuple[list[str], list[Any], list[bool]]:
    """The texts, raw labels (None where absent) and validation marks of a .jsonl file."""
    texts: list[str] = []
    labels: list[Any] = []
    val: list[bool] = []
    for lineno, row in json_objects(path):
        if not isinstance(row.get("text"), str):
            raise DatasetInvalid(
                f'line {lineno} has no "text" string; each line is {{"text": …, "label": …}}'
            )
        texts.append(row["text"])
        labels.append(row.get("label"))
        val.append(is_validation(row, lineno))
    if not texts:
        raise DatasetInvalid("the .jsonl file has no lines; upload a file with samples")
    return texts, labels, val


def label_ids(labels: list[Any], label2id: dict[str, int] | None) -> np.ndarray | None:
    """Raw labels → int64 class ids (-1 unlabeled); None when no line has a label."""
    if all(v is None for v in labels):
        return None
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, v in enumerate(labels):
        if v is None:
            continue
        if isinstance(v, str):
            if not label2id or v not in label2id:
                known = sorted(label2id or {})
                raise DatasetInvalid(
                    f"line {i + 1}: label '{v}' is not a label name of the teacher (its "
                    f"id2label has {known[:20]}); use those names or integer ids",
                    details={"field": "dataset_id"},
                )
            out[i] = label2id[v]
        elif isinstance(v, int) and not isinstance(v, bool) and v >= -1:
            out[i] = v
        else:
            raise DatasetInvalid(
                f"line {i + 1}: label {v!r} is neither an integer class (-1: unlabeled) nor a "
                "label name"
            )
    return out


def load_text_transfer_set(
    path: Path,
    tokenizer: Any,
    *,
    max_length: int,
    id2label: dict[str, str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> TransferSet:
    """A ``.jsonl`` file as a transfer set of packed (N, 2, L) token inputs."""
    texts, raw, is_val = read_jsonl(path)
    label2id = {name: int(i) for i, name in (id2label or {}).items()}
    y = label_ids(raw, label2id)
    parts = [
        encode(tokenizer, texts[i : i + ENCODE_CHUNK], max_length)
        for i in range(0, len(texts), ENCODE_CHUNK)
    ]
    length = max(p.shape[-1] for p in parts)
    x = np.zeros((len(texts), 2, length), dtype=np.int64)
    x[:, 0] = tokenizer.pad_token_id
    row = 0
    for p in parts:
        x[row : row + len(p), :, : p.shape[-1]] = p.numpy()
        row += len(p)
    names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
    arrays = _Arrays(x, y, class_names=names)
    val = np.asarray(is_val)
    if val.any():
        if val.all():
            raise DatasetInvalid('every line has "split": "val"; the student needs training lines')
        arrays = _Arrays(
            x[~val],
            None if y is None else y[~val],
            x[val],
            None if y is None else y[val],
            class_names=names,
        )
    ts = _to_transfer_set(arrays, val_fraction, seed)
    ts.text = True
    if names:
        ts.n_classes = len(names)
    return ts
