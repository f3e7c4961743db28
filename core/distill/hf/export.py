"""Exports of an ``hf`` student, each checked by loading it back.

- ``student_hf``: a zip of ``save_pretrained`` (config, safetensors weights, the teacher's
  tokenizer); ``AutoModelForSequenceClassification`` (classifiers) or ``AutoModel`` (encoders:
  mean-pool the last hidden state over the attention mask) loads the unzipped folder. A
  ``dynamic_int8`` student is stored dequantized (the int8 weights as floats); quantize it again
  after loading for int8 speed.
- ``student_onnx``: inputs ``input_ids`` and ``attention_mask`` (int64, dynamic batch and
  sequence axes), output ``logits`` or ``embeddings``; checked with onnxruntime against the
  torch student on the validation inputs (int8: quantized by onnxruntime, as for other students).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from core.distill.hf.models import HFModel, load_folder
from core.distill.types import Artifact
from core.errors import ExportFailed

ONNX_OPSET = 17
RELOAD_ATOL = 1e-4
CHECK_ROWS = 256  # validation rows the reloaded exports are compared on


class _Unpacked(nn.Module):
    """An HFModel taking ``(input_ids, attention_mask)`` as two inputs, for ONNX."""

    def __init__(self, inner: HFModel) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner(torch.stack([input_ids, attention_mask], 1))


def _float_form(student: nn.Module) -> tuple[HFModel, str]:
    from core.distill.compress import dequantize
    from core.distill.export import _quantization

    mode = _quantization(student)
    model = dequantize(student) if mode == "dynamic_int8" else student
    return model, mode  # type: ignore[return-value]


def export_hf_student(
    student: HFModel,
    formats: list[str],
    x_val: Tensor,
    staging: Path,
    log: Callable[[str], None],
    name: str = "student",
) -> tuple[list[Artifact], dict[str, Any]]:
    """Write the requested exports (``hf``, ``onnx``) of the ``name`` model (the student, or
    the labels-only baseline) into ``staging``; their checks."""
    artifacts: list[Artifact] = []
    checks: dict[str, Any] = {}
    x = x_val[:CHECK_ROWS].cpu()
    with torch.no_grad():
        reference = student.eval()(x).float()
    for fmt in formats:
        log(f"exporting the {name} as {fmt}")
        if fmt == "hf":
            path = staging / f"{name}_hf.zip"
            checks["hf"] = export_hf_zip(student, path, x, reference)
            artifacts.append(Artifact(path.name, f"{name}_hf", path))
        elif fmt == "onnx":
            path = staging / f"{name}.onnx"
            checks["onnx"] = export_hf_onnx(student, path, x, reference)
            artifacts.append(Artifact(path.name, f"{name}_onnx", path))
        else:
            raise ExportFailed(f"export '{fmt}' is not available for a Hugging Face student")
    return artifacts, checks


def save_folder(student: HFModel, folder: Path) -> str:
    """``save_pretrained`` of the student (float weights) and its tokenizer; the quantization
    the weights came from."""
    model, mode = _float_form(student)
    model.model.save_pretrained(folder)
    if student.tokenizer is not None:
        student.tokenizer.save_pretrained(folder)
    return mode


def export_hf_zip(student: HFModel, path: Path, x: Tensor, reference: Tensor) -> dict[str, Any]:
    """The student's ``save_pretrained`` folder as a zip (files at its root), reloaded and
    compared with the trained student on ``x``."""
    work = Path(tempfile.mkdtemp(prefix="hf-export-"))
    try:
        folder = work / "student_hf"
        mode = save_folder(student, folder)
        reloaded = load_folder(folder)
        reloaded.task = student.task
        with torch.no_grad():
            got = reloaded(x).float()
        diff = float((got - reference).abs().max()) if len(x) else 0.0
        allowed = RELOAD_ATOL if mode == "none" else 0.1 * float(reference.abs().max())
        if not diff <= max(allowed, RELOAD_ATOL):
            raise ExportFailed(
                f"the reloaded save_pretrained student differs from the trained one by {diff:.3g}"
            )
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(folder).as_posix())
        tmp.replace(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"max_abs_diff": diff, "quantization": mode}


def export_hf_onnx(student: HFModel, path: Path, x: Tensor, reference: Tensor) -> dict[str, Any]:
    """ONNX of the student over (input_ids, attention_mask), checked with onnxruntime."""
    import onnxruntime as ort

    from core.distill.export import QUANTIZED_RTOL, _onnx_quantize_dynamic

    model, mode = _float_form(student)
    output = "embeddings" if student.task == "feature_extraction" else "logits"
    out_axes = {0: "batch", 1: "sequence"} if student.task == "causal_lm" else {0: "batch"}
    tmp = path.with_name(path.name + ".tmp.onnx")
    float_tmp = path.with_name(path.name + ".float.onnx")
    try:
        with warnings.catch_warnings(action="ignore"), torch.no_grad():
            example = x[:2]
            torch.onnx.export(
                _Unpacked(model.eval()),
                (example[:, 0], example[:, 1]),
                str(float_tmp if mode == "dynamic_int8" else tmp),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["input_ids", "attention_mask"],
                output_names=[output],
                dynamic_axes={
                    "input_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "sequence"},
                    output: out_axes,
                },
                do_constant_folding=True,
            )
            if mode == "dynamic_int8":
                _onnx_quantize_dynamic(float_tmp, tmp)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_ids": x[:, 0].numpy(), "attention_mask": x[:, 1].numpy()})[
            0
        ]
    except ExportFailed:
        raise
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise ExportFailed(
            f"the student cannot be exported to ONNX ({type(exc).__name__}: {str(exc)[:500]}); "
            "export it as hf instead"
        ) from None
    finally:
        float_tmp.unlink(missing_ok=True)
    diff = float(np.abs(np.asarray(got) - reference.numpy()).max()) if len(x) else 0.0
    scale = float(reference.abs().max()) if len(x) else 0.0
    allowed = max(1e-3, (QUANTIZED_RTOL if mode == "dynamic_int8" else 0.0) * scale)
    if not diff <= allowed:
        tmp.unlink(missing_ok=True)
        raise ExportFailed(
            f"the ONNX student's outputs differ from the torch student's by {diff:.3g} "
            f"(allowed {allowed:.3g}); export it as hf instead"
        )
    tmp.replace(path)
    return {
        "max_abs_diff": diff,
        "opset": ONNX_OPSET,
        "tolerance": allowed,
        "quantization": mode,
        "inputs": ["input_ids", "attention_mask"],
        "output": output,
    }
