"""The operator allowlist: graphs that touch files are refused after loading, before running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cli.digits import DigitsCNN
from core.distill.architectures import build_architecture
from core.distill.operators import allowed_operators, check_exported_program, check_torchscript
from core.distill.students import _load_trainable
from core.distill.teachers import load_teacher
from core.distill.types import ModelFile
from core.errors import UnsafeModelFile
from tests.core.model_files import (
    save_exported_file_reader,
    save_exported_program,
    save_file_reader,
    save_file_writer,
    save_torchscript,
)


def test_the_allowlist_keeps_inference_operators_and_drops_files_and_custom_namespaces() -> None:
    allowed = allowed_operators()
    for name in ("aten::linear", "aten::conv2d", "aten::softmax", "prim::Constant", "prim::If"):
        assert name in allowed
    for name in ("aten::from_file", "aten::save", "prim::PythonOp", "prim::rpc_async"):
        assert name not in allowed
    assert not [n for n in allowed if not n.startswith(("aten::", "prim::", "quantized::"))]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_bytes(b"tenant-a-storage-key=0123456789abcdef" * 4)
    return path


def _refused(path: Path, fmt: str) -> list[UnsafeModelFile]:
    """The refusals of the teacher loader and the student loader (what uploads and jobs use)."""
    errors = []
    with pytest.raises(UnsafeModelFile) as teacher:
        load_teacher(ModelFile(path, fmt), input_shape=(1, 8, 8))
    errors.append(teacher.value)
    with pytest.raises(UnsafeModelFile) as student:
        _load_trainable(ModelFile(path, fmt), [1, 8, 8], "float32", 10)
    errors.append(student.value)
    return errors


def test_torchscript_reading_a_file_is_refused_and_nothing_of_it_comes_back(
    tmp_path: Path, secret: Path
) -> None:
    path = save_file_reader(tmp_path / "reader.pt", secret, 32)
    for error in _refused(path, "torchscript"):
        assert "'aten::from_file'" in error.message and "does not run" in error.message
        assert error.details == {"operator": "aten::from_file"}
        assert b"tenant" not in str(error.to_dict()).encode()
    with pytest.raises(torch.jit.Error, match="tenant-a-storage-key"):  # a live attack
        torch.jit.load(str(path))(torch.zeros(1, 1, 8, 8))


def test_torchscript_writing_a_file_is_refused_and_the_file_keeps_its_bytes(
    tmp_path: Path, secret: Path
) -> None:
    before = secret.read_bytes()
    path = save_file_writer(tmp_path / "writer.pt", secret, 16)
    for error in _refused(path, "torchscript"):
        assert "'aten::from_file'" in error.message
    assert secret.read_bytes() == before
    torch.jit.load(str(path))(torch.zeros(1, 1, 8, 8))
    assert secret.read_bytes() != before  # a live attack


def test_an_exported_program_calling_from_file_is_refused(tmp_path: Path, secret: Path) -> None:
    path = save_exported_file_reader(tmp_path / "reader.pt2", secret)
    for error in _refused(path, "exported_program"):
        assert "'aten::from_file'" in error.message
    # A live attack: in a process that never registered a shape function, it loads and reads.
    assert torch.export.load(str(path)).module()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_an_exported_graph_calling_python_is_refused() -> None:
    """A deserialised target can be any callable reachable from ``torch`` (``os.system``)."""
    ep = torch.export.export(DigitsCNN(width=4).eval(), (torch.zeros(2, 1, 8, 8),))
    node = next(n for n in ep.graph.nodes if n.op == "call_function")
    node.target = os.system
    with pytest.raises(UnsafeModelFile, match="'system'"):
        check_exported_program(ep)


@pytest.mark.parametrize(
    ("arch", "shape", "dtype"),
    [
        ("mlp", [1, 8, 8], torch.float32),
        ("cnn", [1, 8, 8], torch.float32),
        ("resnet", [3, 16, 16], torch.float32),
        ("transformer", [12], torch.int64),
    ],
)
def test_the_built_in_architectures_pass_in_both_graph_formats(
    tmp_path: Path, arch: str, shape: list[int], dtype: torch.dtype
) -> None:
    config = {"input_shape": shape, "output_dim": 10}
    if arch == "transformer":
        config["vocab_size"] = 50
    model = build_architecture(arch, config).eval()
    example = torch.zeros([2, *shape], dtype=dtype)
    check_torchscript(torch.jit.load(str(save_torchscript(model, tmp_path / "m.pt"))))
    check_exported_program(
        torch.export.load(str(save_exported_program(model, tmp_path / "m.pt2", example)))
    )


@pytest.mark.parametrize("mode", ["dynamic_int8", "static_int8", "fp16"])
def test_the_services_own_quantized_torchscript_exports_pass(tmp_path: Path, mode: str) -> None:
    """A compressed artifact, downloaded and uploaded again as a teacher, is accepted."""
    from core.distill.compress import quantize
    from core.distill.formats import check_torchscript_archive

    model = build_architecture("mlp", {"input_shape": [1, 8, 8], "output_dim": 10}).eval()
    quantized = quantize(model, mode, calibration=torch.rand(16, 1, 8, 8))
    path = save_torchscript(quantized, tmp_path / "q.pt", torch.rand(2, 1, 8, 8))
    check_torchscript_archive(path)
    check_torchscript(torch.jit.load(str(path)))


def test_the_walk_enters_subgraphs_held_as_node_attributes() -> None:
    """Fusion and differentiable-graph nodes keep their body as an attribute, not a block."""
    from core.distill.operators import _script_nodes

    graph, body = torch._C.Graph(), torch._C.Graph()
    body.appendNode(body.create("aten::from_file", 0))
    holder = graph.create("prim::DifferentiableGraph", 0)
    holder.g_("Subgraph", body)
    graph.appendNode(holder)
    assert [n.kind() for n in _script_nodes(graph.nodes())] == [
        "prim::DifferentiableGraph",
        "aten::from_file",
    ]
