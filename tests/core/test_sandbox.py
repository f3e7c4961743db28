"""The sandbox: files are opened in a limited child process; results and errors come back."""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.distill.architectures import build_architecture
from core.distill.inspect import inspect_dataset_file, inspect_model_file
from core.distill.sandbox import keep_warm, run_sandboxed, stop_warm
from core.errors import DatasetInvalid, InvalidSpec, ModelInvalid, UnsafeModelFile
from tests.core.model_files import (
    save_all_formats,
    save_malicious_torch_save,
    save_safetensors,
    save_torchscript,
)

# --- functions the child runs ------------------------------------------------------------------

PROCESS_TOKEN = secrets.token_hex(8)  # new in every process that imports this module


def child_echo(value: dict) -> dict:
    return {"pid": os.getpid(), "value": value, "threads": os.environ.get("OMP_NUM_THREADS")}


def child_raise(code: str) -> None:
    if code == "invalid_spec":
        raise InvalidSpec("bad hint layer", field="distillation.hints")
    raise DatasetInvalid("x has NaN")


def child_allocate(mb: int) -> int:
    return len(bytearray(mb * 1024 * 1024))


def child_started() -> dict:
    """When this process started, and whether torch was imported before the call came."""
    import sys

    import psutil

    return {
        "process": PROCESS_TOKEN,
        "started": psutil.Process().create_time(),
        "torch": "torch" in sys.modules,
    }


def child_crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


# --- models that misbehave ---------------------------------------------------------------------


class Hang(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1_000_000_000_000):
            x = x * 1.0
        return x


class Greedy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum() + torch.ones(1_000_000_000).sum()  # 4 GB: fits the machine, not the limit


def test_results_come_back_as_json_from_another_process() -> None:
    out = run_sandboxed(
        "tests.core.test_sandbox:child_echo", {"value": {"a": [1, 2]}}, timeout_s=60, memory_mb=1024
    )
    assert out["value"] == {"a": [1, 2]}
    assert out["pid"] != os.getpid()
    assert out["threads"] == "1"


@pytest.mark.parametrize(
    ("code", "cls"), [("invalid_spec", InvalidSpec), ("dataset_invalid", DatasetInvalid)]
)
def test_errors_come_back_with_their_class_and_code(code: str, cls: type) -> None:
    with pytest.raises(cls) as info:
        run_sandboxed(
            "tests.core.test_sandbox:child_raise", {"code": code}, timeout_s=60, memory_mb=1024
        )
    assert info.value.code == code
    if code == "invalid_spec":
        assert info.value.field == "distillation.hints"
        assert info.value.message == "bad hint layer"


@pytest.mark.slow
def test_memory_limit_is_enforced() -> None:
    assert (
        run_sandboxed(
            "tests.core.test_sandbox:child_allocate", {"mb": 50}, timeout_s=60, memory_mb=1024
        )
        == 50 * 1024 * 1024
    )
    with pytest.raises(ModelInvalid, match="needs more than 1024 MB"):
        run_sandboxed(
            "tests.core.test_sandbox:child_allocate", {"mb": 2048}, timeout_s=60, memory_mb=1024
        )


@pytest.fixture
def warm() -> Iterator[None]:
    keep_warm(("torch",))
    yield
    stop_warm()


def test_a_warm_child_has_done_its_imports_and_serves_one_call(warm: None) -> None:
    time.sleep(0.5)
    before = time.time()
    first = run_sandboxed("tests.core.test_sandbox:child_started", {}, timeout_s=60, memory_mb=4096)
    second = run_sandboxed(
        "tests.core.test_sandbox:child_started", {}, timeout_s=60, memory_mb=4096
    )
    # Started before the call, torch already imported; and a fresh process for every call.
    assert first["started"] < before and first["torch"]
    assert second["torch"] and second["process"] != first["process"]


@pytest.mark.slow
def test_a_warm_child_still_enforces_the_limits(warm: None) -> None:
    with pytest.raises(ModelInvalid, match="needs more than 1024 MB"):
        run_sandboxed(
            "tests.core.test_sandbox:child_allocate", {"mb": 2048}, timeout_s=60, memory_mb=1024
        )
    with pytest.raises(ModelInvalid, match="crashed.*SIGSEGV"):
        run_sandboxed("tests.core.test_sandbox:child_crash", {}, timeout_s=60, memory_mb=1024)
    assert (
        run_sandboxed(
            "tests.core.test_sandbox:child_echo", {"value": 1}, timeout_s=60, memory_mb=1024
        )["value"]
        == 1
    )


def test_a_crash_is_reported_not_propagated() -> None:
    with pytest.raises(ModelInvalid, match="crashed.*SIGSEGV"):
        run_sandboxed("tests.core.test_sandbox:child_crash", {}, timeout_s=60, memory_mb=1024)


@pytest.mark.slow
def test_a_model_whose_forward_hangs_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    path = save_torchscript(Hang(), tmp_path / "hang.pt")
    started = time.monotonic()
    with pytest.raises(ModelInvalid, match="took longer than 15 s"):
        inspect_model_file(path, input_shape=[4], timeout_s=15)
    assert time.monotonic() - started < 40


def test_a_model_that_allocates_too_much_is_stopped(tmp_path: Path) -> None:
    path = save_torchscript(Greedy(), tmp_path / "greedy.pt")
    with pytest.raises(ModelInvalid, match="needs more than 3072 MB"):
        inspect_model_file(path, input_shape=[4], memory_mb=3072)


def test_a_pickle_is_refused_in_the_sandbox_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = save_malicious_torch_save(tmp_path / "model.pt", marker)
    with pytest.raises(UnsafeModelFile) as info:
        inspect_model_file(path)
    assert info.value.code == "unsafe_model_file"
    assert not marker.exists()


@pytest.mark.slow
def test_inspection_records_each_formats_signature(tmp_path: Path) -> None:
    # Imported here: the sandbox's child imports this module in a cage that holds the project's
    # core, worker and tests packages, not the command's (cli).
    from cli.digits import DigitsCNN

    torch.manual_seed(0)
    files = save_all_formats(
        DigitsCNN(width=4),
        tmp_path,
        torch.rand(2, 1, 8, 8),
    )
    for fmt, path in files.items():
        result = inspect_model_file(path, input_shape=[1, 8, 8] if fmt == "torchscript" else None)
        assert result.format == fmt
        assert result.info.inputs[0].shape == [None, 1, 8, 8]
        assert result.info.outputs[0].shape == [None, 10]
        assert result.parameters == sum(p.numel() for p in DigitsCNN(width=4).parameters())
        assert result.trainable == (fmt != "onnx")
    config = {"input_shape": [1, 8, 8], "output_dim": 10, "width": 4, "depth": 1}
    preset = build_architecture("cnn", config)
    path = save_safetensors(preset, tmp_path / "cnn.safetensors", "cnn", config)
    result = inspect_model_file(path)
    assert (result.format, result.arch, result.arch_config) == ("safetensors", "cnn", config)
    assert result.info.inputs[0].shape == [None, 1, 8, 8]
    assert result.info.outputs[0].shape == [None, 10]
    assert result.parameters == sum(p.numel() for p in preset.parameters())


@pytest.mark.slow
def test_a_declared_format_must_match(tmp_path: Path) -> None:
    path = save_torchscript(nn.Linear(3, 2), tmp_path / "lin.pt")
    with pytest.raises(ModelInvalid, match="declared as 'onnx'"):
        inspect_model_file(path, format="onnx")
    inspection = inspect_model_file(path)  # a first Linear declares its input
    assert inspection.info.inputs[0].shape == [None, 3]
    assert inspection.info.outputs[0].shape == [None, 2]


@pytest.mark.slow
def test_dataset_inspection(tmp_path: Path) -> None:
    path = tmp_path / "upload.bin"
    rng = np.random.default_rng(0)
    np.savez(path.with_suffix(".npz"), x=rng.random((20, 5)), y=np.arange(20) % 3)
    path.with_suffix(".npz").rename(path)
    result = inspect_dataset_file(path, "mine.npz", {})
    assert result.format == "npz"
    assert result.info.n_samples == 20
    assert result.info.x_shape == [None, 5]
    assert result.info.n_classes == 3
    bad = tmp_path / "bad.bin"
    np.savez(bad.with_suffix(".npz"), inputs=np.zeros((3, 2)))
    bad.with_suffix(".npz").rename(bad)
    with pytest.raises(DatasetInvalid, match="no array 'x'"):
        inspect_dataset_file(bad, "bad.npz", {})
