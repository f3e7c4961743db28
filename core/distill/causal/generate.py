"""Completions of prompts: the teacher's for ``seqkd``, the student's for ``gkd``.

Prompts are left-padded for ``generate`` (decoder-only models continue from the right), then
each prompt and its completion are packed right-padded into the engine's rows, the completion's
tokens (through the first end-of-text) marked as the loss's targets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.distill.causal.data import Line, TokenRows, encode_lines
from core.distill.hf.models import HFModel
from core.spec import GenerateSpec

GENERATE_BATCH = 16


@torch.no_grad()
def complete(
    model: HFModel,
    prompts: list[str],
    gen: GenerateSpec,
    device: torch.device,
    *,
    max_length: int,
) -> list[list[int]]:
    """The completion token ids of each prompt (sampled as ``gen`` says; greedy at T = 0)."""
    tok = model.tokenizer
    model.eval().to(device)
    out: list[list[int]] = []
    for start in range(0, len(prompts), GENERATE_BATCH):
        batch = prompts[start : start + GENERATE_BATCH]
        ids = [tok(p, add_special_tokens=False)["input_ids"][-(max_length - 1) :] for p in batch]
        width = max(len(i) for i in ids)
        new = max(1, min(gen.max_new_tokens, max_length - width))
        x = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, row in enumerate(ids):
            x[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        sample = gen.temperature > 0
        generated = model.model.generate(
            input_ids=x.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            do_sample=sample,
            temperature=gen.temperature if sample else None,
            top_p=gen.top_p if sample else None,
            pad_token_id=tok.pad_token_id,
        )[:, width:].cpu()
        for row in generated.tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            out.append(row)
    return out


def rows_of(
    tokenizer: Any, prompts: list[str], completions: list[list[int]], max_length: int
) -> TokenRows:
    """Prompt + completion rows with the loss on the completion (and its end-of-text)."""
    lines = [
        Line(prompt=p, completion=tokenizer.decode(c))
        for p, c in zip(prompts, completions, strict=True)
    ]
    return encode_lines(lines, tokenizer, max_length)


def on_policy_rows(
    student: HFModel,
    prompts: list[str],
    gen: GenerateSpec,
    device: torch.device,
    max_length: int,
) -> TokenRows:
    """The student's own completions of ``prompts`` as training rows (``gkd``)."""
    was_training = student.training
    completions = complete(student, prompts, gen, device, max_length=max_length)
    student.train(was_training)
    return rows_of(student.tokenizer, prompts, completions, max_length)


@dataclass
class OnPolicy:
    """``gkd``: ``n`` of the training prompts, completed by the student as it is now.

    The prompts are drawn with ``generator`` (seeded by the job), which a checkpoint saves so
    that a resumed job draws the prompts the uninterrupted one would have.
    """

    student: HFModel
    prompts: list[str]
    gen: GenerateSpec
    device: torch.device
    max_length: int
    seed: int
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, n: int) -> TokenRows:
        pick = torch.randint(len(self.prompts), (n,), generator=self.generator).tolist()
        prompts = [self.prompts[i] for i in pick]
        return on_policy_rows(self.student, prompts, self.gen, self.device, self.max_length)


def teacher_generations(
    teacher: HFModel,
    prompts: list[str],
    gen: GenerateSpec,
    device: torch.device,
    *,
    max_length: int,
    store: Path,
    seed: int,
) -> tuple[list[str], list[str], bool]:
    """``gen.samples`` teacher completions per prompt (``seqkd``), stored in ``store`` (a
    .jsonl) and read from it by later jobs on the same teacher, prompts and settings; whether
    they were read."""
    if store.is_file():
        rows = [json.loads(line) for line in store.read_text().splitlines() if line]
        return [r["prompt"] for r in rows], [r["completion"] for r in rows], True
    all_prompts = [p for p in prompts for _ in range(gen.samples)]
    # Sampled from the seed alone, and leaving the job's random state as it was: the student
    # trains alike whether the generations were made now or read.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        completions = complete(teacher, all_prompts, gen, device, max_length=max_length)
    texts = [teacher.tokenizer.decode(c) for c in completions]
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_suffix(".tmp")
    tmp.write_text(
        "".join(
            json.dumps({"prompt": p, "completion": c}) + "\n"
            for p, c in zip(all_prompts, texts, strict=True)
        )
    )
    tmp.replace(store)
    return all_prompts, texts, False


def generations_key(teacher_sha: str, dataset_sha: str, gen: GenerateSpec, max_length: int) -> str:
    settings = hashlib.sha256(gen.model_dump_json().encode()).hexdigest()[:12]
    return f"seqkd-{teacher_sha[:24]}-{dataset_sha[:24]}-L{max_length}-{settings}.jsonl"
