"""Student presets, shrunk teachers and uploaded trainable students."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.distill.architectures import build_architecture
from core.distill.features import record_features
from core.distill.students import build_student, count_parameters
from core.distill.teachers import ModuleTeacher
from core.distill.types import ModelFile
from core.errors import InvalidSpec, ShapeMismatch
from core.spec import ModelInfo, StudentSpec, TensorInfo


def build(preset: str, shape: list, dtype: str = "float32", out: int = 10, **knobs) -> nn.Module:
    spec = StudentSpec(preset=preset, **knobs)
    return build_student(spec, input_shape=shape, input_dtype=dtype, output_dim=out)


@pytest.mark.parametrize(
    ("preset", "shape"),
    [
        ("mlp", [None, 1, 8, 8]),
        ("mlp", [None, 20]),
        ("cnn", [None, 3, 12, 10]),
        ("cnn", [None, 8, 8]),
        ("resnet", [None, 1, 8, 8]),
        ("transformer", [None, 6, 5]),
    ],
)
def test_presets_fit_the_data_and_expose_penultimate_features(preset, shape):
    model = build(
        preset, shape, width=8, depth=2, **({"heads": 2} if preset == "transformer" else {})
    )
    x = torch.rand(3, *shape[1:])
    with record_features(model, [model.penultimate, *model.hint_layers]) as feats:
        out = model(x)
    assert out.shape == (3, 10)
    penultimate = feats[model.penultimate]
    assert penultimate.dim() == 2 and len(penultimate) == 3
    torch.testing.assert_close(model.head(penultimate), out)  # the head's input, exactly
    for layer in getattr(model, "attention_layers", []):
        assert feats[layer].dim() == 4


def test_rebuilt_from_its_arch_json_gives_the_same_model():
    model = build("cnn", [None, 1, 8, 8], width=4, depth=3)
    copy = build_architecture(model.distill_arch["name"], model.distill_arch["config"])
    copy.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 8, 8)
    model.eval(), copy.eval()
    assert torch.equal(model(x), copy(x))
    assert count_parameters(copy) == sum(p.numel() for p in model.parameters())


def test_knobs_size_the_student():
    small = build("mlp", [None, 64], width=16, depth=1)
    big = build("mlp", [None, 64], width=64, depth=3)
    assert count_parameters(small) == 64 * 16 + 16 + 16 * 10 + 10
    assert count_parameters(big) > 4 * count_parameters(small)


def test_transformer_masks_padding():
    model = build("transformer", [None, 12], dtype="int64", out=3, width=16, heads=4, depth=2)
    model.eval()
    tokens = torch.tensor([[5, 9, 33, 2, 0, 0, 0, 0]])
    assert model.distill_arch["config"]["tokens"] is True
    torch.testing.assert_close(model(tokens), model(tokens[:, :4]))  # padding changes nothing
    assert torch.isfinite(model(torch.zeros(2, 8, dtype=torch.long))).all()


def test_mlp_on_token_ids_embeds_them():
    model = build("mlp", [None, 10], dtype="int64", out=2, width=8)
    tokens = torch.tensor([[3, 4, 0, 0], [3, 4, 0, 0]])
    assert model(tokens).shape == (2, 2)


@pytest.mark.parametrize(
    ("preset", "shape", "dtype"),
    [
        ("cnn", [None, 64], "float32"),
        ("resnet", [None, 12], "int64"),
        ("transformer", [None, 64], "float32"),
    ],
)
def test_preset_that_does_not_fit_the_data_names_student_preset(preset, shape, dtype):
    with pytest.raises(InvalidSpec) as err:
        build(preset, shape, dtype=dtype)
    assert err.value.field == "student.preset"
    assert preset in err.value.message


def test_shrink_rebuilds_the_teachers_architecture_narrower():
    big = build_architecture(
        "cnn", {"input_shape": [1, 8, 8], "output_dim": 10, "width": 32, "depth": 2}
    )
    info = ModelInfo(
        format="safetensors",
        inputs=[TensorInfo(shape=[None, 1, 8, 8], dtype="float32")],
        outputs=[TensorInfo(shape=[None, 10], dtype="float32")],
        arch="cnn",
    )
    teacher = ModuleTeacher(big, info)
    small = build_student(
        StudentSpec(shrink=0.25), input_shape=[1, 8, 8], input_dtype="float32", output_dim=10,
        teacher=teacher,
    )  # fmt: skip
    assert small.distill_arch["config"]["width"] == 8
    assert count_parameters(small) < count_parameters(big) / 8
    assert small(torch.rand(2, 1, 8, 8)).shape == (2, 10)

    no_arch = ModuleTeacher(nn.Linear(64, 10), info.model_copy(update={"arch": None}))
    with pytest.raises(InvalidSpec) as err:
        build_student(
            StudentSpec(shrink=0.5), input_shape=[64], input_dtype="float32", output_dim=10,
            teacher=no_arch,
        )  # fmt: skip
    assert err.value.field == "student.shrink"


def _trains(model: nn.Module, x: torch.Tensor) -> bool:
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()
    return any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_uploaded_students_load_and_train(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    x = torch.rand(4, 1, 8, 8)
    spec = StudentSpec(model_id="mdl_1")
    kw = {"input_shape": [1, 8, 8], "input_dtype": "float32", "output_dim": 10}

    torch.jit.save(torch.jit.script(net), tmp_path / "s.pt")
    scripted = build_student(spec, **kw, model_file=ModelFile(tmp_path / "s.pt", "torchscript"))
    torch.testing.assert_close(scripted(x), net(x))
    assert _trains(scripted, x)

    torch.export.save(torch.export.export(net, (x,)), tmp_path / "s.pt2")
    exported = build_student(
        spec, **kw, model_file=ModelFile(tmp_path / "s.pt2", "exported_program")
    )
    torch.testing.assert_close(exported(x), net(x))
    assert _trains(exported, x)

    preset = build("mlp", [None, 1, 8, 8], width=16, depth=1)
    save_file(preset.state_dict(), tmp_path / "s.safetensors")
    model_file = ModelFile(
        tmp_path / "s.safetensors", "safetensors", arch="mlp",
        arch_config=preset.distill_arch["config"],
    )  # fmt: skip
    restored = build_student(spec, **kw, model_file=model_file)
    torch.testing.assert_close(restored(x), preset(x))
    assert _trains(restored, x)


def test_uploaded_student_with_wrong_output_or_format_is_refused(tmp_path):
    torch.jit.save(
        torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(64, 3))), tmp_path / "s.pt"
    )
    with pytest.raises(ShapeMismatch, match="outputs \\[2, 3\\]"):
        build_student(
            StudentSpec(model_id="m"), input_shape=[1, 8, 8], input_dtype="float32",
            output_dim=10, model_file=ModelFile(tmp_path / "s.pt", "torchscript"),
        )  # fmt: skip
    with pytest.raises(InvalidSpec, match="can't be trained"):
        build_student(
            StudentSpec(model_id="m"), input_shape=[1, 8, 8], input_dtype="float32",
            output_dim=10, model_file=ModelFile(tmp_path / "s.onnx", "onnx"),
        )  # fmt: skip


@pytest.mark.parametrize("preset", ["transformer", "mlp"])
def test_token_presets_fit_the_datas_vocabulary(preset: str) -> None:
    """Ids of another tokenizer (all-MiniLM's go to 30521) fit the student's embedding table,
    instead of an IndexError in the worker."""
    student = build_student(
        StudentSpec(preset=preset),
        input_shape=(16,),
        input_dtype=torch.int64,
        output_dim=3,
        vocab_size=30522,
    )
    ids = torch.randint(0, 30522, (4, 16))
    ids[:, 0] = 30521
    assert student(ids).shape == (4, 3)
