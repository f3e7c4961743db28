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
