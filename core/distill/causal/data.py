"""Text for causal-LM jobs, encoded by the teacher's tokenizer.

``{"text": …}`` lines are joined (an end-of-text token between documents) and cut into windows
of ``max_length`` tokens, every token a target. ``{"prompt": …, "completion": …}`` lines are one
row each, the loss on the completion's tokens only (and its end-of-text). ``"split": "val"``
puts a line in the validation split; without any, ``val_fraction`` of the lines is held out.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.distill.jsonl import is_validation, json_objects
from core.errors import DatasetInvalid, InvalidSpec

DEFAULT_MAX_LENGTH = 256


@dataclass
class Line:
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    lineno: int | None = None  # in the uploaded file, for the messages that name it


@dataclass
class TokenRows:
    """Rows of one split: ``x`` (N, 2, L) token ids and attention mask, ``target`` (N, L) true
    where the token is one the loss predicts (from the position before)."""

    x: Tensor
    target: Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class LMData:
    train: TokenRows
    val: TokenRows
    sha256: str  # of the dataset file: with the teacher's, the cache key
    max_length: int
    prompts: list[str] = field(default_factory=list)  # validation prompts for the samples
    has_prompts: bool = False
    train_prompts: list[str] = field(default_factory=list)  # seqkd and gkd complete these


def read_lines(path: Path) -> tuple[list[Line], list[bool]]:
    """The lines of a causal-LM ``.jsonl`` and their validation marks."""
    lines: list[Line] = []
    val: list[bool] = []
    for lineno, row in json_objects(path):
        if isinstance(row.get("text"), str):
            line = Line(text=row["text"], lineno=lineno)
        elif isinstance(row.get("prompt"), str):
            completion = row.get("completion")
            if completion is not None and not isinstance(completion, str):
                raise DatasetInvalid(f'line {lineno}: "completion" is not a string')
            line = Line(prompt=row["prompt"], completion=completion, lineno=lineno)
        else:
            raise DatasetInvalid(
                f'line {lineno} has neither "text" nor "prompt"; a causal-LM line is '
                '{"text": …} or {"prompt": …, "completion": …}'
            )
        lines.append(line)
        val.append(is_validation(row, lineno))
    if not lines:
        raise DatasetInvalid("the .jsonl file has no lines; upload a file with samples")
    return lines, val


def load_lm_data(
    path: Path,
    tokenizer: Any,
    *,
    max_length: int,
    val_fraction: float,
    seed: int,
) -> LMData:
    lines, is_val = read_lines(path)
    if not any(is_val):
        order = list(range(len(lines)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(lines) * val_fraction)) if len(lines) > 1 else 0
        held = set(order[:n_val])
        is_val = [i in held for i in range(len(lines))]
    train = [ln for ln, v in zip(lines, is_val, strict=True) if not v]
    val = [ln for ln, v in zip(lines, is_val, strict=True) if v]
    if not train or not val:
        raise DatasetInvalid("a causal-LM job needs training and validation lines")
    prompts = [ln.prompt for ln in val if ln.prompt is not None][:4]
    if not prompts:
        prompts = [_opening(tokenizer, ln.text or "") for ln in val if ln.text][:4]
    return LMData(
        train=encode_lines(train, tokenizer, max_length),
        val=encode_lines(val, tokenizer, max_length),
        sha256=hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        max_length=max_length,
        prompts=[p for p in prompts if p],
        has_prompts=any(ln.prompt is not None for ln in lines),
        train_prompts=[ln.prompt for ln in train if ln.prompt is not None],
    )


def _opening(tokenizer: Any, text: str, tokens: int = 12) -> str:
    """The first few tokens of a text, as a prompt for the samples."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return str(tokenizer.decode(ids))


def encode_lines(lines: list[Line], tokenizer: Any, max_length: int) -> TokenRows:
    """Windows of the texts and one row per prompt/completion, padded to one length."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    rows: list[tuple[list[int], list[bool]]] = []
    stream: list[int] = []
    for line in lines:
        if line.text is not None:
            stream += _ids(tokenizer, line.text) + ([eos] if eos is not None else [])
            continue
        prompt = _ids(tokenizer, line.prompt or "")
        if len(prompt) >= max_length:
            raise _prompt_too_long(line, len(prompt), max_length)
        completion = _ids(tokenizer, line.completion or "") + ([eos] if eos is not None else [])
        ids = (prompt + completion)[:max_length]
        rows.append((ids, [False] * len(prompt) + [True] * (len(ids) - len(prompt))))
    for start in range(0, len(stream), max_length):
        chunk = stream[start : start + max_length]
        if len(chunk) > 1:
            rows.append((chunk, [False] + [True] * (len(chunk) - 1)))
    if not rows:
        raise DatasetInvalid("the lines encode to no tokens")
    length = max(len(ids) for ids, _ in rows)
    x = torch.zeros(len(rows), 2, length, dtype=torch.long)
    x[:, 0] = pad
    target = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (ids, tgt) in enumerate(rows):
        x[i, 0, : len(ids)] = torch.tensor(ids)
        x[i, 1, : len(ids)] = 1
        target[i, : len(ids)] = torch.tensor(tgt)
    return TokenRows(x, target)


def _prompt_too_long(line: Line, tokens: int, max_length: int) -> InvalidSpec:
    """A prompt that leaves no room for a completion token is refused, never cut."""
    where = f"line {line.lineno}" if line.lineno is not None else "a line"
    return InvalidSpec(
        f"{where}: the prompt has {tokens} tokens (by the teacher's tokenizer) and "
        f"training.max_length is {max_length}, which leaves no room for its completion; "
        f"raise training.max_length above {tokens} or shorten the prompt",
        field="training.max_length",
        details={"line": line.lineno, "prompt_tokens": tokens, "max_length": max_length},
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
