"""Safetensors teachers and uploaded students go through one loader and refuse the same files."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.distill.architectures import build_architecture
from core.distill.students import build_student
from core.distill.teachers import load_teacher
from core.distill.types import ModelFile
from core.errors import ModelInvalid
from core.spec import StudentSpec
from tests.core.model_files import save_safetensors

CONFIG = {"input_shape": [12], "output_dim": 3, "width": 16, "depth": 1}


def _as_teacher(file: ModelFile) -> nn.Module:
    return load_teacher(file).module  # type: ignore[attr-defined]


def _as_student(file: ModelFile) -> nn.Module:
    return build_student(
        StudentSpec(model_id="mdl_1"), input_shape=[12], input_dtype="float32", output_dim=3,
        model_file=file,
    )  # fmt: skip


LOADERS: dict[str, Callable[[ModelFile], nn.Module]] = {
    "teacher": _as_teacher,
    "student": _as_student,
}


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_architecture("mlp", CONFIG).eval()


def _file(path: Path, **kw: Any) -> ModelFile:
    return ModelFile(path, "safetensors", **kw)


@pytest.mark.parametrize("role", LOADERS)
def test_the_weights_load_from_the_arch_given_or_the_files_metadata(role, mlp, tmp_path):
    x = torch.rand(4, 12)
    named = save_safetensors(mlp, tmp_path / "named.safetensors", "mlp", CONFIG)
    bare = save_safetensors(mlp, tmp_path / "bare.safetensors")
    for file in (_file(named), _file(bare, arch="mlp", arch_config=CONFIG)):
        model = LOADERS[role](file).eval()
        torch.testing.assert_close(model(x), mlp(x))


def _truncated(mlp: nn.Module, path: Path) -> Path:
    whole = save_safetensors(mlp, path, "mlp", CONFIG).read_bytes()
    path.write_bytes(whole[:-40])
    return path


def _pickled(mlp: nn.Module, path: Path) -> Path:
    path.write_bytes(pickle.dumps({"note": "never opened"}))
    return path


def _other_weights(mlp: nn.Module, path: Path) -> Path:
    return save_safetensors(nn.Linear(12, 3), path, "mlp", CONFIG)


def _bad_config(mlp: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    meta = {"distill_arch": "mlp", "distill_arch_config": "[1, 2]"}
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path), metadata=meta)
    return path


BAD_FILES = {
    "truncated": (_truncated, "truncated"),
    "a pickle": (_pickled, "not a safetensors file"),
    "other weights": (_other_weights, "missing keys"),
    "config not an object": (_bad_config, "not a JSON object"),
}


@pytest.mark.parametrize("role", LOADERS)
@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_model_invalid_for_teachers_and_students(role, case, mlp, tmp_path):
    write, message = BAD_FILES[case]
    path = write(mlp, tmp_path / "bad.safetensors")
    with pytest.raises(ModelInvalid, match=message):
        LOADERS[role](_file(path))


@pytest.mark.parametrize("role", LOADERS)
def test_weights_without_an_arch_name_one(role, mlp, tmp_path):
    bare = save_safetensors(mlp, tmp_path / "bare.safetensors")
    with pytest.raises(ModelInvalid, match="give 'arch'"):
        LOADERS[role](_file(bare))
