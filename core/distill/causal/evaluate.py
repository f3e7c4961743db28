"""What a causal-LM job reports for the teacher, the student and the baseline.

- ``perplexity``: exp of the mean next-token cross-entropy over the validation targets;
- ``token_agreement``: how often the model's most likely next token is the teacher's;
- ``kl_to_teacher``: mean KL(teacher ‖ model) per validation token;
- ``latency_ms_per_token`` and ``tokens_per_s``: greedy decoding at batch 1 with the KV cache
  (``generate``), the median of a few runs after a warm-up, on the job's device;
- ``samples``: the teacher's and the student's greedy continuations of validation prompts.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from core.distill.causal.data import TokenRows
from core.distill.causal.placement import device_of, teacher_logits
from core.distill.hf.models import HFModel
from core.distill.methods.token_losses import forward_kl

EVAL_BATCH = 8
DECODE_TOKENS = 32
DECODE_RUNS = 3
SAMPLE_TOKENS = 24


def _batches(rows: TokenRows, device: torch.device):  # type: ignore[no-untyped-def]
    for start in range(0, len(rows), EVAL_BATCH):
        xb = rows.x[start : start + EVAL_BATCH].to(device)
        mask = rows.target[start : start + EVAL_BATCH, 1:].to(device) & xb[:, 1, 1:].bool()
        yield start, xb, mask


@torch.no_grad()
def perplexity(model: HFModel, rows: TokenRows, device: torch.device) -> float:
    model.eval().to(device)
    nll, count = 0.0, 0
    for _, xb, mask in _batches(rows, device):
        logits = model(xb)[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), xb[:, 0, 1:], reduction="none")
        nll += float((ce * mask).sum())
        count += int(mask.sum())
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def quality(
    model: HFModel, teacher: HFModel | None, rows: TokenRows, device: torch.device
) -> dict[str, float]:
    """Perplexity, and agreement and KL with the teacher (when given) on ``rows``."""
    model.eval().to(device)
    nll = agree = kl = 0.0
    count = 0
    for _, xb, mask in _batches(rows, device):
        logits = model(xb)[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), xb[:, 0, 1:], reduction="none")
        nll += float((ce * mask).sum())
        count += int(mask.sum())
        if teacher is not None:
            t_logits = teacher_logits(teacher, xb, device)[:, :-1]
            agree += float(((logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum())
            per_token = forward_kl(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1))
            kl += float((per_token * mask).sum())
    n = max(count, 1)
    out = {"perplexity": round(math.exp(nll / n), 4)}
    if teacher is not None:
        out["token_agreement"] = round(agree / n, 4)
        out["kl_to_teacher"] = round(kl / n, 5)
    return out


def size(model: HFModel) -> dict[str, int]:
    """Parameters and their bytes (tied weights once; int8 layers' packed weights counted)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    tensors = list(model.model.parameters())
    for module in model.model.modules():
        if isinstance(module, nnqd.Linear):
            weight, bias = module._weight_bias()
            tensors += [weight] + ([bias] if bias is not None else [])
    return {
        "parameters": sum(t.numel() for t in tensors),
        "size_bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


@torch.no_grad()
def decoding_speed(model: HFModel, prompt_ids: list[int], device: torch.device) -> dict[str, float]:
    """Greedy decoding of ``DECODE_TOKENS`` tokens at batch 1 with the KV cache."""
    model.eval().to(device)
    ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(ids)
    times = []
    for i in range(DECODE_RUNS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = _generate(model, ids, mask, DECODE_TOKENS, min_new=DECODE_TOKENS)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append((time.perf_counter() - t0) / max(out.shape[1] - ids.shape[1], 1))
    per_token = statistics.median(times)
    return {
        "latency_ms_per_token": round(per_token * 1000, 4),
        "tokens_per_s": round(1 / per_token, 2),
    }


def _generate(
    model: HFModel, ids: torch.Tensor, mask: torch.Tensor, new: int, min_new: int = 0
) -> torch.Tensor:
    tok = model.tokenizer
    return model.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=min_new,
        do_sample=False,
        use_cache=True,
        pad_token_id=tok.pad_token_id,
    )


@torch.no_grad()
def samples(
    teacher: HFModel, student: HFModel, prompts: list[str], device: torch.device
) -> list[dict[str, str]]:
    """Greedy continuations of each prompt, the teacher's (on its own device) beside the
    student's (on ``device``)."""
    out = []
    tok = teacher.tokenizer
    student.eval().to(device)
    for prompt in prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] == 0:
            continue
        row = {"prompt": prompt}
        for name, model in (("teacher", teacher.eval()), ("student", student)):
            where = ids.to(device_of(model))
            gen = _generate(model, where, torch.ones_like(where), SAMPLE_TOKENS)
            row[name] = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        out.append(row)
    return out


def report(
    model: HFModel,
    teacher: HFModel | None,
    rows: TokenRows,
    prompt_ids: list[int],
    device: torch.device,
) -> dict[str, Any]:
    """Every metric of one model."""
    return {
        **quality(model, teacher, rows, device),
        **size(model),
        **decoding_speed(model, prompt_ids, device),
    }
