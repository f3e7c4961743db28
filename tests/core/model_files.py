"""Teacher files of every format, for tests: plain functions that write a model to disk.

Each ``save_*`` function writes one file and returns its path; :func:`save_all_formats` writes
one of each. ``example`` is an input batch of the model (its batch dimension is made dynamic).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def save_exported_program(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """``torch.export.save`` with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))
    return Path(path)


def save_torchscript(model: nn.Module, path: Path, example: torch.Tensor | None = None) -> Path:
    """``torch.jit.save`` of ``torch.jit.script`` (``torch.jit.trace`` when scripting fails)."""
    model = model.eval()
    try:
        scripted = torch.jit.script(model)
    except Exception:
        if example is None:
            raise
        scripted = torch.jit.trace(model, example)
    torch.jit.save(scripted, str(path))
    return Path(path)


def save_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """Single-file ONNX with a dynamic batch axis (legacy exporter)."""
    torch.onnx.export(
        model.eval(),
        (example,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    return Path(path)


def save_safetensors(
    model: nn.Module, path: Path, arch: str | None = None, config: dict[str, Any] | None = None
) -> Path:
    """The state dict as safetensors; ``arch``/``config`` go into the header metadata."""
    from safetensors.torch import save_file

    metadata = None
    if arch is not None:
        metadata = {"distill_arch": arch, "distill_arch_config": json.dumps(config or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def save_all_formats(
    model: nn.Module,
    folder: Path,
    example: torch.Tensor,
    arch: str | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """One file per format: format name → path (safetensors only when ``arch`` is given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "exported_program": save_exported_program(model, folder / "model.pt2", example),
        "torchscript": save_torchscript(model, folder / "model.pt", example),
        "onnx": save_onnx(model, folder / "model.onnx", example),
    }
    if arch is not None:
        files["safetensors"] = save_safetensors(model, folder / "model.safetensors", arch, config)
    return files


class _Marker:
    """Unpickling this creates ``path``: proof that a file was (wrongly) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def save_malicious_pickle(path: Path, marker: Path) -> Path:
    """A raw pickle whose loading would create ``marker``."""
    Path(path).write_bytes(pickle.dumps({"model": _Marker(str(marker))}, protocol=4))
    return Path(path)


def save_malicious_torch_save(path: Path, marker: Path) -> Path:
    """A ``torch.save`` zip archive whose loading would create ``marker``."""
    torch.save({"model": _Marker(str(marker)), "weight": torch.zeros(2)}, str(path))
    return Path(path)


def save_pickled_model(model: nn.Module, path: Path) -> Path:
    """``torch.save(model)``: the whole module pickled (the format users must not upload)."""
    torch.save(model, str(path))
    return Path(path)


def save_onnx_classifier(
    x: np.ndarray, y: np.ndarray, path: Path, kind: str = "logistic", zipmap: bool = False
) -> tuple[Any, Path]:
    """A scikit-learn classifier fitted on flat ``x`` and converted with skl2onnx.

    Returns (the fitted estimator, the path); its ONNX outputs are ``label`` and
    ``probabilities`` (a ZipMap of them when ``zipmap`` is True).
    """
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    flat = x.reshape(len(x), -1).astype(np.float32)
    if kind == "logistic":
        clf: Any = LogisticRegression(max_iter=500)
    else:
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0)
    clf.fit(flat, y)
    onx = to_onnx(clf, flat[:1], options={id(clf): {"zipmap": zipmap}})
    Path(path).write_bytes(onx.SerializeToString())
    return clf, Path(path)


# --- hostile archives: each loads (and does harm) with plain torch; the service refuses them ---


class _ReadsFile(nn.Module):
    """``forward`` reads ``size`` bytes of ``path`` and raises them as the error message."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size = path, size
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
        values: list[int] = data.long().tolist()
        text = ""
        for byte in values:
            text += chr(byte)
        raise RuntimeError(text)


class _WritesFile(nn.Module):
    """``forward`` maps ``path`` shared and overwrites its first ``size`` bytes with ``A``."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size = path, size
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
        target.copy_(torch.full([self.size], 65, dtype=torch.uint8))
        # Used in the output, so that TorchScript keeps the write.
        return self.head(x) + target[:1].float() * 0


def save_file_reader(path: Path, target: Path, size: int) -> Path:
    """TorchScript whose forward raises the first ``size`` bytes of ``target`` as its error."""
    torch.jit.save(torch.jit.script(_ReadsFile(str(target), size)), str(path))
    return Path(path)


def save_file_writer(path: Path, target: Path, size: int) -> Path:
    """TorchScript whose forward overwrites the first ``size`` bytes of ``target``."""
    torch.jit.save(torch.jit.script(_WritesFile(str(target), size)), str(path))
    return Path(path)


class _WritesOnLoad(nn.Module):
    """Overwrites ``path`` from ``__setstate__``: ``torch.jit.load`` runs it while loading."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size = path, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, int, bool]:
        return (self.path, self.size, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, int, bool]) -> None:
        self.path, size, self.training = state
        target = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
        target.copy_(torch.full([size], 65, dtype=torch.uint8))
        self.size = int(target.long().sum()) * 0 + size  # used, so that TorchScript keeps it


def save_load_time_writer(path: Path, target: Path, size: int) -> Path:
    """TorchScript whose ``__setstate__`` overwrites ``target`` when it is loaded."""
    torch.jit.save(torch.jit.script(_WritesOnLoad(str(target), size)), str(path))
    return Path(path)


def _rewrite_archive(src: Path, dst: Path, change: Any) -> Path:
    """Copy a zip archive entry by entry; ``change(prefix, name, data)`` gives the new entries."""
    import warnings
    import zipfile

    with (
        zipfile.ZipFile(src) as zin,
        zipfile.ZipFile(dst, "w") as zout,
        warnings.catch_warnings(action="ignore", category=UserWarning),  # duplicate names
    ):
        prefix = zin.namelist()[0].split("/", 1)[0]
        for item in zin.infolist():
            inner = item.filename.split("/", 1)[1]
            for name, data in change(prefix, inner, zin.read(item)):
                zout.writestr(f"{prefix}/{name}", data)
    return Path(dst)


def save_duplicate_config_attack(src: Path, dst: Path, marker: Path) -> Path:
    """The export archive of ``src`` with its constants config twice and a pickled object.

    The first copy of ``data/constants/model_constants_config.json`` declares an opaque object
    (``torch.export.load`` unpickles it, creating ``marker``), the second is the original:
    torch's reader takes the first, Python's ``zipfile`` the last.
    """
    evil = {
        "obj": {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }
    }

    def change(prefix: str, name: str, data: bytes) -> list[tuple[str, bytes]]:
        if name != "data/constants/model_constants_config.json":
            return [(name, data)]
        payload = pickle.dumps(_Marker(str(marker)), protocol=4)
        return [
            (name, json.dumps({"config": evil}).encode()),
            (name, data),
            ("data/constants/opaque_obj_0", payload),
        ]

    return _rewrite_archive(src, dst, change)


def save_shape_expression_attack(src: Path, dst: Path, marker: Path) -> Path:
    """The export archive of ``src`` (dynamic batch) with a shape expression that creates
    ``marker`` when ``torch.export.load`` hands it to ``sympy.sympify``."""
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def change(prefix: str, name: str, data: bytes) -> list[tuple[str, bytes]]:
        if not name.startswith("models/"):
            return [(name, data)]
        text = data.decode()
        start = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', start)
        return [(name, (text[:start] + code.replace('"', '\\"') + text[end:]).encode())]

    return _rewrite_archive(src, dst, change)


class _ExportedReader(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.ops.aten.from_file(self.path, shared=False, size=64, dtype=torch.uint8)
        return self.head(x + data.float().reshape(1, 1, 8, 8))


def save_exported_file_reader(path: Path, target: Path) -> Path:
    """A torch.export archive whose graph calls ``aten::from_file`` on ``target``.

    torch.export needs a shape function to capture the operator; one is registered only while
    exporting. The saved archive loads and runs in any process.
    """
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl(
            "from_file",
            lambda filename, shared=None, size=0, **kw: torch.empty(
                size, dtype=kw.get("dtype"), device="meta"
            ),
            "Meta",
        )
        example = torch.zeros(2, 1, 8, 8)
        torch.export.save(torch.export.export(_ExportedReader(str(target)), (example,)), str(path))
    finally:
        lib._destroy()
    return Path(path)
