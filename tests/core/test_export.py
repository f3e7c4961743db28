"""Exported students reload with their standard loaders and give the torch model's outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cli.digits import train_classifier
from core.distill.architectures import build_architecture
from core.distill.compress import prune, quantize
from core.distill.evaluate import predict, quality_metrics
from core.distill.export import (
    export_onnx,
    export_safetensors,
    export_torchscript,
    load_safetensors_student,
    write_report,
)
from core.errors import ExportFailed


@pytest.fixture(scope="module")
def student(digits) -> nn.Module:
    """A small `mlp` preset trained briefly on digits, so that its metrics mean something."""
    torch.manual_seed(0)
    model = build_architecture("mlp", {"input_shape": [1, 8, 8], "output_dim": 10, "width": 64})
    return train_classifier(model, digits["x_train"], digits["y_train"], epochs=3)


@pytest.fixture(scope="module")
def x_val(digits) -> torch.Tensor:
    return torch.from_numpy(digits["x_test"])


def _metrics(model, x: torch.Tensor, digits) -> dict[str, float]:
    y = torch.from_numpy(digits["y_test"])
    return quality_metrics(predict(model, x), task="classification", y=y)


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_torchscript_reloads_with_the_same_outputs(student, x_val, digits, tmp_path) -> None:
    path = tmp_path / "student.pt"
    export_torchscript(student, x_val[:2], path)
    loaded = torch.jit.load(str(path))
    assert torch.allclose(predict(loaded, x_val), predict(student, x_val), atol=1e-6)
    assert _metrics(loaded, x_val, digits) == _metrics(student, x_val, digits)
    assert _metrics(student, x_val, digits)["accuracy"] > 0.8
    extra = {"distill_arch.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["distill_arch.json"])["name"] == "mlp"
    assert _leftovers(tmp_path) == []


class _NotScriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(*[x])  # star-args: scripting fails, tracing works


def test_torchscript_falls_back_to_tracing(tmp_path) -> None:
    model = _NotScriptable().eval()
    x = torch.randn(5, 4)
    export_torchscript(model, x, tmp_path / "m.pt")
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    other = torch.randn(7, 4)  # another batch size than the traced one
    with torch.no_grad():
        assert torch.allclose(loaded(other), model(other), atol=1e-6)


def test_onnx_reloads_with_dynamic_batch_and_same_metrics(student, x_val, digits, tmp_path):
    path = tmp_path / "student.onnx"
    check = export_onnx(student, x_val[:1], path, check_inputs=x_val[:64])
    assert check["opset"] >= 17 and check["max_abs_diff"] < 1e-4
    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 3, len(x_val)):  # any batch size
        out = session.run(None, {"input": x_val[:n].numpy()})[0]
        assert out.shape == (n, 10)
    assert torch.allclose(predict(session, x_val), predict(student, x_val), atol=1e-4)
    assert _metrics(session, x_val, digits) == _metrics(student, x_val, digits)
    assert _leftovers(tmp_path) == []


def test_onnx_of_a_dynamic_int8_student(student, x_val, tmp_path) -> None:
    float_path, int8_path = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    wide = build_architecture("mlp", {"input_shape": [1, 8, 8], "output_dim": 10, "width": 512})
    export_onnx(wide.eval(), x_val[:1], float_path, check_inputs=x_val[:8])
    q = quantize(wide, "dynamic_int8")
    check = export_onnx(q, x_val[:1], int8_path, check_inputs=x_val[:128])
    assert check["quantization"] == "dynamic_int8"
    assert float_path.stat().st_size / int8_path.stat().st_size > 3
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    got, want = predict(session, x_val), predict(q, x_val)
    assert (got - want).abs().max() <= check["tolerance"]
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.95


def test_onnx_of_an_fp16_student_halves_the_file(student, x_val, tmp_path) -> None:
    export_onnx(student, x_val[:1], tmp_path / "f32.onnx", check_inputs=x_val[:8])
    half = quantize(student, "fp16", calibration=x_val[:8])
    check = export_onnx(half, x_val[:1], tmp_path / "f16.onnx", check_inputs=x_val[:64])
    ratio = (tmp_path / "f16.onnx").stat().st_size / (tmp_path / "f32.onnx").stat().st_size
    assert 0.45 < ratio < 0.6
    session = ort.InferenceSession(str(tmp_path / "f16.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"  # float32 in, like the torch model
    assert (predict(session, x_val) - predict(half, x_val)).abs().max() <= check["tolerance"]


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # tracing keeps one branch only: the ONNX graph is wrong for the other
            return x * 2
        return -x


def test_onnx_mismatch_fails_and_leaves_no_file(tmp_path) -> None:
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportFailed, match="differ") as info:
        export_onnx(_Branchy(), torch.ones(1, 3), path, check_inputs=-torch.ones(4, 3))
    assert info.value.details["max_abs_diff"] > 1
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_safetensors_rebuilds_from_the_arch_json(student, x_val, digits, tmp_path) -> None:
    path = tmp_path / "student.safetensors"
    arch_path = export_safetensors(student, path, example=x_val[:16])
    assert arch_path == tmp_path / "student.arch.json"
    description = json.loads(arch_path.read_text())
    assert description["name"] == "mlp" and description["format_version"] == 1
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["distill_arch"] == "mlp"
    assert json.loads(meta["distill_arch_config"]) == description["config"]
    rebuilt = build_architecture(description["name"], description["config"])
    rebuilt.load_state_dict(state)
    rebuilt.eval()
    assert torch.equal(predict(rebuilt, x_val), predict(student, x_val))
    assert _metrics(rebuilt, x_val, digits) == _metrics(student, x_val, digits)
    assert _leftovers(tmp_path) == []
    # Readable like every other artifact (safetensors alone would leave it 0600).
    assert path.stat().st_mode & 0o777 == arch_path.stat().st_mode & 0o777


def test_safetensors_of_a_structurally_pruned_student(x_val, tmp_path) -> None:
    model = build_architecture("cnn", {"input_shape": [1, 8, 8], "output_dim": 10}).eval()
    pruned = prune(model, amount=0.5, structured=True, example_input=x_val[:4])
    path = tmp_path / "student.safetensors"
    export_safetensors(pruned, path, example=x_val[:8])
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["distill_pruned"] == "structured"
    rebuilt = load_safetensors_student(path)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )
    assert torch.allclose(predict(rebuilt, x_val), predict(pruned, x_val), atol=1e-6)


def test_safetensors_of_quantized_students(student, x_val, tmp_path) -> None:
    q = quantize(student, "dynamic_int8")
    export_safetensors(q, tmp_path / "q.safetensors", example=x_val[:8])
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        assert f.metadata()["distill_quantization"] == "dynamic_int8"
    rebuilt = load_safetensors_student(tmp_path / "q.safetensors")
    # dequantized int8 weights: close to the int8 model, not bit-equal (activations stay float)
    assert (predict(rebuilt, x_val) - predict(q, x_val)).abs().max() < 0.1

    half = quantize(student, "fp16", calibration=x_val[:4])
    export_safetensors(half, tmp_path / "h.safetensors", example=x_val[:8])
    assert load_file(str(tmp_path / "h.safetensors"))["head.weight"].dtype == torch.float16
    assert torch.equal(
        predict(load_safetensors_student(tmp_path / "h.safetensors"), x_val), predict(half, x_val)
    )

    static = quantize(student, "static_int8", calibration=x_val[:64])
    with pytest.raises(ExportFailed, match="static_int8"):
        export_safetensors(static, tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()
    assert not (tmp_path / "s.arch.json").exists()


def test_safetensors_refuses_a_model_without_architecture(tmp_path) -> None:
    with pytest.raises(ExportFailed, match="torchscript or onnx"):
        export_safetensors(nn.Linear(2, 2), tmp_path / "m.safetensors")
    impostor = nn.Linear(2, 2)
    impostor.distill_arch = {"name": "mlp", "config": {"input_shape": [2], "output_dim": 2}}
    with pytest.raises(ExportFailed, match="do not match architecture 'mlp'"):
        export_safetensors(impostor, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_compressed_students_export_to_torchscript(student, x_val, tmp_path) -> None:
    for mode in ("dynamic_int8", "fp16", "static_int8"):
        q = quantize(student, mode, calibration=x_val[:64])
        export_torchscript(q, x_val[:2], tmp_path / f"{mode}.pt")
        loaded = torch.jit.load(str(tmp_path / f"{mode}.pt"))
        assert torch.allclose(predict(loaded, x_val), predict(q, x_val), atol=1e-5), mode


def test_write_report_is_plain_json(tmp_path) -> None:
    path = tmp_path / "report.json"
    result = {"student": {"accuracy": np.float32(0.5), "speedup": float("nan")}}
    history = [{"epoch": 1, "val_loss": torch.tensor(0.25).item(), "lr": torch.tensor([1e-3])}]
    write_report(path, result, history, {"task": "classification", "path": tmp_path})
    body = json.loads(path.read_text())
    assert body["result"]["student"] == {"accuracy": 0.5, "speedup": None}
    assert body["history"][0]["lr"] == [pytest.approx(1e-3)]
    assert body["spec"]["path"] == str(tmp_path)
    assert path.read_text().startswith('{\n  "result"')
    assert _leftovers(tmp_path) == []
