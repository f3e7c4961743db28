"""Teachers of every format give the outputs of the model they were made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli.digits import DigitsCNN
from core.distill.architectures import build_architecture
from core.distill.teachers import EnsembleTeacher, ModuleTeacher, load_teacher
from core.distill.types import ModelFile
from core.errors import InvalidSpec, ModelInvalid
from core.spec import ModelInfo, TensorInfo
from tests.core.model_files import (
    save_all_formats,
    save_exported_program,
    save_onnx_classifier,
    save_safetensors,
)

FORMATS = ["exported_program", "torchscript", "onnx", "safetensors"]
CNN_CONFIG = {"input_shape": [1, 8, 8], "output_dim": 10, "width": 8, "depth": 2}


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN(width=8).eval()


@pytest.fixture(scope="module")
def files(reference: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_all_formats(reference, tmp_path_factory.mktemp("teachers"), torch.rand(2, 1, 8, 8))


@pytest.fixture(scope="module")
def preset() -> nn.Module:
    """A built-in architecture (the cnn preset), whose weights travel as safetensors."""
    torch.manual_seed(1)
    model = build_architecture("cnn", CNN_CONFIG).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _load(fmt: str, files: dict[str, Path], preset: nn.Module, tmp: Path) -> tuple:
    if fmt == "safetensors":
        path = save_safetensors(preset, tmp / "preset.safetensors", "cnn", CNN_CONFIG)
        return load_teacher(ModelFile(path, fmt)), preset
    return load_teacher(ModelFile(files[fmt], fmt)), None


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_outputs_of_its_model(
    fmt: str, files: dict[str, Path], reference: nn.Module, preset: nn.Module, tmp_path: Path
) -> None:
    teacher, model = _load(fmt, files, preset, tmp_path)
    model = model or reference
    x = torch.rand(37, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    out = teacher.predict(x)
    assert out.shape == (37, 10)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert not out.requires_grad
    assert teacher.parameters == sum(p.numel() for p in model.parameters())
    assert teacher.size_bytes > 0
    if fmt == "torchscript":  # no declared input: the first Conv2d gives channels only
        assert teacher.info.inputs[0].shape == [None, 1, None, None]
        assert teacher.info.outputs[0].shape is None
    else:
        assert teacher.info.inputs[0].shape == [None, 1, 8, 8]
        assert teacher.info.outputs[0].shape == [None, 10]


def test_torchscript_signature_comes_from_the_given_input_shape(files: dict[str, Path]) -> None:
    teacher = load_teacher(ModelFile(files["torchscript"], "torchscript"), input_shape=[1, 8, 8])
    assert teacher.info.inputs[0].shape == [None, 1, 8, 8]
    assert teacher.info.outputs[0].shape == [None, 10]


def test_torch_teachers_are_frozen(files: dict[str, Path]) -> None:
    for fmt in ("exported_program", "torchscript"):
        teacher = load_teacher(ModelFile(files[fmt], fmt))
        assert not any(p.requires_grad for p in teacher.module.parameters())
        assert not teacher.module.training


def test_predict_splits_large_inputs_into_batches(files: dict[str, Path]) -> None:
    teacher = load_teacher(ModelFile(files["onnx"], "onnx"))
    x = torch.rand(50, 1, 8, 8)
    whole = teacher.predict(x)
    teacher.batch_size = 7
    torch.testing.assert_close(teacher.predict(x), whole)


def test_a_frozen_batch_size_export_still_takes_any_batch(
    reference: nn.Module, tmp_path: Path
) -> None:
    ep = torch.export.export(reference, (torch.rand(4, 1, 8, 8),))  # batch frozen at 4
    path = tmp_path / "fixed.pt2"
    torch.export.save(ep, str(path))
    teacher = load_teacher(ModelFile(path, "exported_program"))
    x = torch.rand(10, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(x), reference(x), atol=1e-5, rtol=1e-5)


def test_teacher_outputs_can_be_loss_targets(files: dict[str, Path]) -> None:
    teacher = load_teacher(ModelFile(files["exported_program"], "exported_program"))
    x = torch.rand(8, 1, 8, 8)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    target = torch.log_softmax(teacher.predict(x), 1)
    loss = nn.functional.kl_div(
        torch.log_softmax(student(x), 1), target, log_target=True, reduction="batchmean"
    )
    loss.backward()
    assert student[1].weight.grad is not None


def test_onnx_probability_classifier_is_a_teacher_that_agrees_with_sklearn(
    digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    clf, path = save_onnx_classifier(
        digits["x_train"], digits["y_train"], tmp_path / "logreg.onnx", kind="logistic"
    )
    teacher = load_teacher(ModelFile(path, "onnx"))
    x = digits["x_test"].reshape(len(digits["x_test"]), -1)
    out = teacher.predict(torch.from_numpy(x))
    assert out.shape == (len(x), 10)
    # Probabilities come back as log-probabilities.
    torch.testing.assert_close(out.exp().sum(1), torch.ones(len(x)), atol=1e-3, rtol=0)
    np.testing.assert_array_equal(out.argmax(1).numpy(), clf.predict(x))
    assert teacher.info.outputs[0].shape == [None, 10]
    assert teacher.parameters > 640


def test_onnx_zipmap_output_is_read(digits: dict[str, np.ndarray], tmp_path: Path) -> None:
    clf, path = save_onnx_classifier(
        digits["x_train"][:400], digits["y_train"][:400], tmp_path / "z.onnx", zipmap=True
    )
    teacher = load_teacher(ModelFile(path, "onnx"))
    x = digits["x_test"][:50].reshape(50, -1)
    out = teacher.predict(torch.from_numpy(x))
    np.testing.assert_allclose(out.exp().numpy(), clf.predict_proba(x), atol=1e-4)


def _hooked(model: nn.Module, x: torch.Tensor, path: str, want_input: bool) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    handle = model.get_submodule(path).register_forward_hook(
        lambda m, i, o: seen.update(t=i[0] if want_input else o)
    )
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["t"]


def test_exported_program_features_by_module_path(
    files: dict[str, Path], reference: nn.Module
) -> None:
    teacher = load_teacher(ModelFile(files["exported_program"], "exported_program"))
    x = torch.rand(9, 1, 8, 8)
    assert teacher.default_feature_layer() == "head.3:input"
    out, feats = teacher.features(x, ["features.2", "head.3:input"])
    torch.testing.assert_close(out, teacher.predict(x))
    torch.testing.assert_close(feats["features.2"], _hooked(reference, x, "features.2", False))
    torch.testing.assert_close(feats["head.3:input"], _hooked(reference, x, "head.3", True))
    assert "features.2" in teacher.describe_layers()


def test_onnx_features_by_tensor_name(files: dict[str, Path], reference: nn.Module) -> None:
    teacher = load_teacher(ModelFile(files["onnx"], "onnx"))
    x = torch.rand(9, 1, 8, 8)
    name = teacher.default_feature_layer()
    assert name in teacher.describe_layers()
    out, feats = teacher.features(x, [name])
    torch.testing.assert_close(out, teacher.predict(x))
    torch.testing.assert_close(
        feats[name], _hooked(reference, x, "head.3", True), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("fmt", ["exported_program", "onnx"])
def test_an_unknown_layer_name_lists_the_valid_ones(fmt: str, files: dict[str, Path]) -> None:
    teacher = load_teacher(ModelFile(files[fmt], fmt))
    with pytest.raises(InvalidSpec, match="has no layer 'nope'") as info:
        teacher.features(torch.rand(2, 1, 8, 8), ["nope"])
    assert teacher.describe_layers()[1] in info.value.message
    assert info.value.field == "distillation.hints"


def test_torchscript_features_point_to_exported_program(files: dict[str, Path]) -> None:
    teacher = load_teacher(ModelFile(files["torchscript"], "torchscript"))
    with pytest.raises(InvalidSpec, match="exported_program"):
        teacher.features(torch.rand(2, 1, 8, 8), ["head.3:input"])


def test_safetensors_needs_an_arch_and_matching_weights(
    preset: nn.Module, reference: nn.Module, tmp_path: Path
) -> None:
    bare = save_safetensors(preset, tmp_path / "bare.safetensors")
    with pytest.raises(ModelInvalid, match="give 'arch'"):
        load_teacher(ModelFile(bare, "safetensors"))
    teacher = load_teacher(ModelFile(bare, "safetensors", arch="cnn", arch_config=CNN_CONFIG))
    assert teacher.info.arch == "cnn"
    wrong = save_safetensors(reference, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelInvalid, match="missing keys") as info:
        load_teacher(ModelFile(wrong, "safetensors", arch="cnn", arch_config=CNN_CONFIG))
    assert "blocks.0.0.weight" in info.value.message
    assert "features.0.weight" in info.value.details["unexpected"]


def test_ensemble_averages_log_softmax_outputs_by_weight() -> None:
    torch.manual_seed(0)
    info = ModelInfo(
        format="exported_program",
        inputs=[TensorInfo(shape=[None, 4], dtype="float32")],
        outputs=[TensorInfo(shape=[None, 3], dtype="float32")],
    )
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    ens = EnsembleTeacher([ModuleTeacher(a, info), ModuleTeacher(b, info)], [3.0, 1.0])
    x = torch.rand(5, 4)
    with torch.no_grad():
        expected = 0.75 * torch.log_softmax(a(x), 1) + 0.25 * torch.log_softmax(b(x), 1)
    torch.testing.assert_close(ens.predict(x), expected)
    assert ens.parameters == 2 * 15
    with pytest.raises(InvalidSpec, match="single teacher"):
        ens.features(x, ["weight"])


class _TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(257, 8, padding_idx=0)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


def test_text_teacher_takes_int64_token_ids(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TokenClassifier().eval()
    tokens = torch.randint(0, 257, (6, 12))
    path = save_exported_program(model, tmp_path / "text.pt2", tokens)
    teacher = load_teacher(ModelFile(path, "exported_program"))
    assert teacher.info.inputs[0].dtype == "int64"
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(tokens), model(tokens))
