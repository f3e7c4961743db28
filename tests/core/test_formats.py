"""Format detection from bytes, and refusal of pickles and ONNX external data."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from core.distill.formats import check_exported_program_archive, detect_format
from core.distill.teachers import load_teacher
from core.distill.types import ModelFile
from core.errors import ModelInvalid, UnsafeModelFile
from tests.conftest import DigitsCNN
from tests.core.model_files import (
    save_all_formats,
    save_malicious_pickle,
    save_malicious_torch_save,
    save_pickled_model,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("formats")
    return save_all_formats(
        DigitsCNN(width=8), folder, torch.rand(2, 1, 8, 8), arch="cnn", config={}
    )


@pytest.mark.parametrize("fmt", ["exported_program", "torchscript", "onnx", "safetensors"])
def test_each_format_is_detected_from_its_bytes(files: dict[str, Path], fmt: str) -> None:
    assert detect_format(files[fmt]) == fmt
    assert detect_format(files[fmt], declared=fmt) == fmt


def test_a_declared_format_that_contradicts_the_bytes_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(ModelInvalid, match="declared as 'onnx'.*'torchscript'"):
        detect_format(files["torchscript"], declared="onnx")
    with pytest.raises(ModelInvalid, match="unknown model format 'keras'"):
        detect_format(files["onnx"], declared="keras")


@pytest.mark.parametrize(
    "save", [save_malicious_pickle, save_malicious_torch_save], ids=["raw", "torch_save"]
)
def test_pickles_are_refused_without_being_unpickled(tmp_path: Path, save) -> None:
    marker = tmp_path / "unpickled"
    path = save(tmp_path / "model.pt", marker)
    with pytest.raises(UnsafeModelFile) as info:
        detect_format(path)
    assert info.value.code == "unsafe_model_file"
    assert "torch.export.save" in info.value.message and "ONNX" in info.value.message
    assert not marker.exists()


def test_a_joblib_scikit_learn_model_is_refused_with_the_way_to_convert_it(tmp_path: Path):
    import joblib
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(40, 4))
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    path = tmp_path / "model.joblib"
    joblib.dump(model, path)
    with pytest.raises(UnsafeModelFile) as info:
        detect_format(path)
    assert "joblib" in info.value.message and "skl2onnx.to_onnx" in info.value.message


def test_a_pickled_whole_module_is_refused(tmp_path: Path) -> None:
    path = save_pickled_model(DigitsCNN(width=4), tmp_path / "model.pt")
    with pytest.raises(UnsafeModelFile, match="torch.save pickle archive"):
        detect_format(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\x13\x37 not a model at all, just some bytes" * 10, "not a model"),
    ],
)
def test_junk_is_refused_with_a_precise_message(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(ModelInvalid, match=message):
        detect_format(path)


@pytest.mark.parametrize("fmt", ["exported_program", "safetensors"])
def test_truncated_files_are_refused(files: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    data = files[fmt].read_bytes()
    path = tmp_path / "cut"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelInvalid, match="truncated"):
        detect_format(path)


def test_onnx_with_external_data_is_refused_with_how_to_save_one_file(
    files: dict[str, Path], tmp_path: Path
) -> None:
    model = onnx.load(str(files["onnx"]))
    path = tmp_path / "external.onnx"
    onnx.save(
        model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    with pytest.raises(ModelInvalid, match="save_as_external_data=False") as info:
        detect_format(path)
    assert "external_data=False" in info.value.message


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd"])
def test_onnx_external_data_outside_its_folder_is_refused(
    files: dict[str, Path], tmp_path: Path, location: str
) -> None:
    model = onnx.load(str(files["onnx"]))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = tmp_path / "escape.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelInvalid, match="outside the model's folder; it was not read"):
        detect_format(path)


def _replace_member(src: Path, dst: Path, suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            body = data if item.filename.endswith(suffix) else zin.read(item)
            zout.writestr(item, body)


def test_an_export_archive_carrying_a_malicious_pickle_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    evil = save_malicious_torch_save(tmp_path / "evil.pt", marker).read_bytes()
    path = tmp_path / "model.pt2"
    _replace_member(files["exported_program"], path, "data/sample_inputs/model.pt", evil)
    assert detect_format(path) == "exported_program"
    with pytest.raises(UnsafeModelFile, match="is a pickle that calls"):
        load_teacher(ModelFile(path, "exported_program"))
    assert not marker.exists()


def test_an_export_archive_with_pickled_weights_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    with zipfile.ZipFile(files["exported_program"]) as zf:
        name = next(n for n in zf.namelist() if n.endswith("model_weights_config.json"))
        config = zf.read(name).replace(b'"use_pickle": false', b'"use_pickle": true', 1)
    path = tmp_path / "model.pt2"
    _replace_member(files["exported_program"], path, "model_weights_config.json", config)
    with pytest.raises(UnsafeModelFile, match="pickled Python object"):
        check_exported_program_archive(path)


def test_a_normal_export_archive_passes_the_pickle_check(files: dict[str, Path]) -> None:
    check_exported_program_archive(files["exported_program"])
    # The check reads the sample-input pickle: it really is there to be checked.
    with zipfile.ZipFile(files["exported_program"]) as zf:
        inner = [n for n in zf.namelist() if "sample_inputs" in n]
        assert inner and zipfile.is_zipfile(io.BytesIO(zf.read(inner[0])))
