"""``compression.quantize: dynamic_int8`` of a causal-LM student.

Every linear layer's weights become int8 (GPT-2's ``Conv1D`` converted to ``nn.Linear``
first; Llama's and Qwen2's projections are ``nn.Linear`` already), activations are quantized
on the fly; the embeddings, the norms and an LM head tied to the embeddings stay float. int8
kernels run on the CPU, so the float student is measured there too (``before``), beside the
quantized one (``after``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from core.distill.causal import evaluate
from core.distill.causal.data import TokenRows
from core.distill.hf.models import HFModel


def quantize_student(
    student: HFModel,
    teacher: HFModel,
    val: TokenRows,
    prompt_ids: list[int],
    trained: dict[str, Any],
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[HFModel, dict[str, Any]]:
    """The int8 student and the ``compression`` step: its figures ``before`` and ``after``,
    and how many of its parameters are int8 (CompressionFailed when none would be)."""
    from core.distill import compress

    cpu = torch.device("cpu")
    log("quantizing the student (dynamic_int8)")
    before = trained
    if device.type != "cpu":  # compare like with like: both on the CPU
        before = evaluate.report(student, teacher, val, prompt_ids, cpu)
    quantized = compress.quantize(student.cpu().eval(), "dynamic_int8", calibration=val.x[:2])
    int8 = compress.quantized_parameters(quantized)
    after = evaluate.report(quantized, teacher, val, prompt_ids, cpu)
    share = int8 / max(after["parameters"], 1)
    log(
        f"dynamic_int8: {int8} of {after['parameters']} parameters ({share:.0%}) are int8; "
        f"perplexity {before['perplexity']} → {after['perplexity']}, "
        f"{before['size_bytes']} → {after['size_bytes']} bytes"
    )
    step = {
        "step": "quantize",
        "mode": "dynamic_int8",
        "device": "cpu",
        "quantized_parameters": int8,
        "quantized_share": round(share, 4),
        "before": before,
        "after": after,
    }
    return quantized, step
