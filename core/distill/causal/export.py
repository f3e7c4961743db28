"""Exports of a causal-LM student: ``student_hf`` and ``student_onnx`` (the forward pass's
logits, no KV cache), both written and compared with the trained student by
:mod:`core.distill.hf.export`; ``student_hf`` is further reloaded the way a user loads it,
``AutoModelForCausalLM.from_pretrained``, which must reproduce the trained student's
perplexity and generate.

With ``dynamic_int8``, ``student_hf`` stays the float student (``save_pretrained`` cannot hold
int8 layers; quantize it again after loading) and ``student_onnx`` is the int8 one: its float
graph quantized by onnxruntime (int8 MatMul/Gemm weights), checked against the torch int8
student's logits."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.distill.causal.data import TokenRows
from core.distill.causal.evaluate import perplexity
from core.distill.hf.export import export_hf_student
from core.distill.hf.models import HFModel
from core.distill.types import Artifact
from core.errors import ExportFailed

PERPLEXITY_RTOL = 1e-3


def export_causal_student(
    student: HFModel,
    formats: list[str],
    val: TokenRows,
    reported_perplexity: float,
    staging: Path,
    log: Callable[[str], None],
    quantized: HFModel | None = None,
) -> tuple[list[Artifact], dict[str, Any]]:
    """``student_hf`` always holds the trained float ``student``; ``student_onnx`` holds the
    ``quantized`` (int8) student when there is one."""
    student = student.cpu().eval()
    float_formats = [f for f in formats if quantized is None or f != "onnx"]
    artifacts, checks = export_hf_student(student, float_formats, val.x, staging, log)
    if quantized is not None and "onnx" in formats:
        more, onnx = export_hf_student(quantized, ["onnx"], val.x, staging, log)
        artifacts += more
        checks.update(onnx)
    if "hf" in checks:
        checks["hf"].update(_reload_check(staging / "student_hf.zip", val, reported_perplexity))
    return artifacts, checks


def _reload_check(path: Path, val: TokenRows, reported: float) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="hf-causal-check-"))
    try:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(work)
        model = AutoModelForCausalLM.from_pretrained(work, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(work, local_files_only=True)
        reloaded = HFModel(model.eval(), "causal_lm", tokenizer)
        ppl = perplexity(reloaded, val, torch.device("cpu"))
        if abs(ppl - reported) > PERPLEXITY_RTOL * reported:
            raise ExportFailed(
                f"the reloaded student_hf has perplexity {ppl:.4f}, not the reported {reported:.4f}"
            )
        ids = val.x[:1, 0, :4]
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"reloaded_perplexity": round(ppl, 4), "generates": int(generated.shape[1]) > 4}
