"""Format detection from bytes, and refusal of pickles and ONNX external data."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cli.digits import DigitsCNN
from core.distill.formats import (
    check_archive_names,
    check_exported_program_archive,
    detect_format,
)
from core.distill.students import _load_trainable
from core.distill.teachers import load_teacher
from core.distill.types import ModelFile
from core.errors import ModelInvalid, UnsafeModelFile
from tests.core.model_files import (
    save_all_formats,
    save_duplicate_config_attack,
    save_load_time_writer,
    save_malicious_pickle,
    save_malicious_torch_save,
    save_pickled_model,
    save_shape_expression_attack,
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


def test_an_export_archive_with_malicious_pickled_weights_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """A weight stored with use_pickle is unpickled by torch.export.load: only tensors pass."""
    marker = tmp_path / "unpickled"
    evil = save_malicious_torch_save(tmp_path / "evil.pt", marker).read_bytes()
    with zipfile.ZipFile(files["exported_program"]) as zf:
        name = next(n for n in zf.namelist() if n.endswith("model_weights_config.json"))
        config = zf.read(name).replace(b'"use_pickle": false', b'"use_pickle": true', 1)
    step = tmp_path / "step.pt2"
    _replace_member(files["exported_program"], step, "model_weights_config.json", config)
    path = tmp_path / "model.pt2"
    _replace_member(step, path, "data/weights/weight_0", evil)
    with pytest.raises(UnsafeModelFile, match="is a pickle that calls"):
        check_exported_program_archive(path)
    assert not marker.exists()


def test_a_normal_export_archive_passes_the_pickle_check(files: dict[str, Path]) -> None:
    check_exported_program_archive(files["exported_program"])
    # The check reads the sample-input pickle: it really is there to be checked.
    with zipfile.ZipFile(files["exported_program"]) as zf:
        inner = [n for n in zf.namelist() if "sample_inputs" in n]
        assert inner and zipfile.is_zipfile(io.BytesIO(zf.read(inner[0])))


# --- the second wall: archives read exactly as torch reads them ----------------------------------


def test_a_duplicate_config_entry_is_refused_before_anything_is_unpickled(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """Attack 3 of issue 14: torch reads the first of two equal names, zipfile the last."""
    marker = tmp_path / "unpickled"
    path = save_duplicate_config_attack(files["exported_program"], tmp_path / "m.pt2", marker)
    with pytest.raises(UnsafeModelFile, match="model_constants_config.json' twice"):
        detect_format(path)
    with pytest.raises(UnsafeModelFile, match="model_constants_config.json' twice"):
        load_teacher(ModelFile(path, "exported_program"))
    with pytest.raises(UnsafeModelFile, match="twice"):
        _load_trainable(ModelFile(path, "exported_program"), [1, 8, 8], "float32", 10)
    assert not marker.exists()
    # The archive is a live attack: plain torch.export.load runs the pickle.
    with contextlib.suppress(Exception):
        torch.export.load(str(path))
    assert marker.exists()


@pytest.mark.parametrize(
    ("names", "words"),
    [
        (["m/a", "m/a"], "'a' twice"),
        (["m/data/x.json", "m/DATA/X.json"], "twice"),
        (["m/caf\u00e9", "m/cafe\u0301"], "twice"),
        (["m/a/./b"], "not a plain relative path"),
        (["m/a/../b"], "not a plain relative path"),
        (["m/a//b"], "not a plain relative path"),
        (["m/a\\b"], "not a plain relative path"),
        (["/m/a"], "not a plain relative path"),
        (["m/a\x00b"], "not a plain relative path"),
    ],
)
def test_colliding_or_unusual_entry_names_are_refused(names: list[str], words: str) -> None:
    with pytest.raises(UnsafeModelFile, match=re.escape(words)):
        check_archive_names([n.split("/", 1)[1] if n[0] != "/" else n for n in names])


def test_a_case_variant_of_an_entry_name_is_refused_in_an_archive(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """torch's reader looks names up ignoring case: the variant could be the one it reads."""
    with zipfile.ZipFile(files["exported_program"]) as zf:
        name = next(n for n in zf.namelist() if n.endswith("model_constants_config.json"))
    path = tmp_path / "m.pt2"
    shutil.copy(files["exported_program"], path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(name.replace("model_constants", "MODEL_constants"), b'{"config": {}}')
    with pytest.raises(UnsafeModelFile, match="twice"):
        detect_format(path)
    with pytest.raises(UnsafeModelFile, match="twice"):
        check_exported_program_archive(path)


@pytest.mark.parametrize(
    "entry", ["data/aotinductor/model/model.so", "data/weights/model.pt", "xl_model_weights/a"]
)
def test_export_archive_entries_torch_export_save_never_writes_are_refused(
    files: dict[str, Path], tmp_path: Path, entry: str
) -> None:
    path = tmp_path / "m.pt2"
    shutil.copy(files["exported_program"], path)
    with zipfile.ZipFile(path, "a") as zf:
        prefix = zf.namelist()[0].split("/", 1)[0]
        zf.writestr(f"{prefix}/{entry}", b"\x7fELF")
    with pytest.raises(UnsafeModelFile, match=f"entry '{re.escape(entry)}'"):
        check_exported_program_archive(path)


def test_an_opaque_object_pickle_is_checked_like_any_pickle(
    files: dict[str, Path], tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    config = {
        "config": {"obj": {"path_name": "opaque_obj_0", "use_pickle": True, "tensor_meta": None}}
    }
    step = tmp_path / "step.pt2"
    _replace_member(
        files["exported_program"],
        step,
        "model_constants_config.json",
        json.dumps(config).encode(),
    )
    path = tmp_path / "m.pt2"
    shutil.copy(step, path)
    with zipfile.ZipFile(path, "a") as zf:
        prefix = zf.namelist()[0].split("/", 1)[0]
        payload = save_malicious_pickle(tmp_path / "evil.pkl", marker).read_bytes()
        zf.writestr(f"{prefix}/data/constants/opaque_obj_0", payload)
    with pytest.raises(UnsafeModelFile, match="is a pickle that calls"):
        load_teacher(ModelFile(path, "exported_program"))
    assert not marker.exists()


def test_a_shape_expression_that_is_python_code_is_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """torch.export.load hands shape expressions to sympy.sympify, which evaluates Python."""
    marker = tmp_path / "evaluated"
    path = save_shape_expression_attack(files["exported_program"], tmp_path / "m.pt2", marker)
    with pytest.raises(UnsafeModelFile, match="not a plain sympy expression"):
        load_teacher(ModelFile(path, "exported_program"))
    assert not marker.exists()
    with contextlib.suppress(Exception):
        torch.export.load(str(path))
    assert marker.exists()  # the archive is a live attack


def test_torchscript_that_runs_code_while_loading_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target.bin"
    path = save_load_time_writer(tmp_path / "m.pt", target, 8)
    target.write_bytes(b"original bytes")
    with pytest.raises(UnsafeModelFile, match="__setstate__"):
        load_teacher(ModelFile(path, "torchscript"))
    with pytest.raises(UnsafeModelFile, match="__setstate__"):
        _load_trainable(ModelFile(path, "torchscript"), [1, 8, 8], "float32", 10)
    assert target.read_bytes() == b"original bytes"
    torch.jit.load(str(path))
    assert target.read_bytes() == b"AAAAAAAA bytes"  # plain torch.jit.load writes it


def _external(name: str, location: str, dtype: int = onnx.TensorProto.FLOAT) -> onnx.TensorProto:
    tensor = onnx.helper.make_tensor(name, dtype, [2], [0, 0])
    tensor.ClearField("int64_data" if dtype == onnx.TensorProto.INT64 else "float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def _onnx_with(place: str, location: str) -> onnx.ModelProto:
    """A one-Add ONNX model with a tensor stored in ``location``, at ``place`` in the model."""
    h, T = onnx.helper, onnx.TensorProto
    x = h.make_tensor_value_info("X", T.FLOAT, [4])
    y = h.make_tensor_value_info("Y", T.FLOAT, [4])
    plain_indices = h.make_tensor("W_indices", T.INT64, [2], [0, 3])
    plain_values = h.make_tensor("W_values", T.FLOAT, [2], [1.0, 2.0])
    nodes = [h.make_node("Add", ["X", "W"], ["Y"])]
    sparse: list[onnx.SparseTensorProto] = []
    functions: list[onnx.FunctionProto] = []
    if place == "sparse initializer values":
        sparse = [h.make_sparse_tensor(_external("W", location), plain_indices, [4])]
    elif place == "sparse initializer indices":
        indices = _external("W_indices", location, T.INT64)
        sparse = [h.make_sparse_tensor(h.make_tensor("W", T.FLOAT, [2], [1, 2]), indices, [4])]
    else:
        value = h.make_sparse_tensor(_external("W", location), plain_indices, [4])
        constant = h.make_node("Constant", [], ["W"], sparse_value=value)
        if place == "sparse attribute in an If branch":
            inner = h.make_graph([constant], "then", [], [y])
            branch = h.make_graph(
                [h.make_node("Constant", [], ["W"], value=plain_values)], "else", [], [y]
            )
            cond = h.make_tensor("c", T.BOOL, [], [True])
            nodes.insert(0, h.make_node("Constant", [], ["C"], value=cond))
            nodes.insert(1, h.make_node("If", ["C"], ["W"], then_branch=inner, else_branch=branch))
        else:  # a function body
            functions = [h.make_function("local", "MakeW", [], ["W"], [constant], [])]
            nodes.insert(0, h.make_node("MakeW", [], ["W"], domain="local"))
    graph = h.make_graph(nodes, "g", [x], [y], sparse_initializer=sparse)
    opsets = [h.make_opsetid("", 17), h.make_opsetid("local", 1)]
    return h.make_model(graph, opset_imports=opsets, functions=functions)


@pytest.mark.parametrize(
    "place",
    [
        "sparse initializer values",
        "sparse initializer indices",
        "sparse attribute in an If branch",
        "sparse attribute in a function body",
    ],
)
def test_onnx_external_data_is_found_in_sparse_tensors_subgraphs_and_functions(
    tmp_path: Path, place: str
) -> None:
    from onnx.external_data_helper import _get_all_tensors

    model = _onnx_with(place, "../../etc/passwd")
    # onnx's own helper (what was checked before) does not see these tensors.
    assert not [t for t in _get_all_tensors(model) if t.data_location == t.EXTERNAL]
    path = tmp_path / "sparse.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelInvalid, match="outside the model's folder; it was not read"):
        detect_format(path)
    # The job's loader checks again (a file stored before this check existed).
    with pytest.raises(ModelInvalid, match="outside the model's folder; it was not read"):
        load_teacher(ModelFile(path, "onnx"))
    path.write_bytes(_onnx_with(place, "weights.bin").SerializeToString())
    with pytest.raises(ModelInvalid, match="save_as_external_data=False"):
        detect_format(path)


@pytest.mark.parametrize(
    ("expr", "plain"),
    [
        ("Symbol('s31', positive=True, integer=True)", True),
        ("Mul(Integer(64), Symbol('s31', positive=True, integer=True))", True),
        ("FloorDiv(Symbol('s0', integer=True), Integer(2))", True),
        ("Add(Float('0.5', precision=53), Integer(-1))", True),
        ("s0*64 + 1", True),
        ("__import__('os').system('id')", False),
        ("floor(\"__import__('os').system('id')\")", False),
        ("Max(Integer(1), \"__import__('os').system('id')\")", False),
        ("Symbol('s0').__class__", False),
        ("Symbol(\"__import__('os')\")", False),
        ("(lambda: 1)()", False),
        ("eval('1')", False),
    ],
)
def test_only_plain_sympy_shape_expressions_pass(expr: str, plain: bool) -> None:
    from core.distill.formats import _is_sympy_expression

    assert _is_sympy_expression(expr) is plain


def test_sample_inputs_in_a_legacy_torch_save_format_are_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """torch.load reads non-zip bytes as legacy formats (a tar among them) with inner pickles."""
    path = tmp_path / "model.pt2"
    legacy = pickle.dumps((torch.zeros(2),), protocol=2)
    _replace_member(files["exported_program"], path, "data/sample_inputs/model.pt", legacy)
    with pytest.raises(UnsafeModelFile, match="not a torch.save zip archive"):
        check_exported_program_archive(path)
