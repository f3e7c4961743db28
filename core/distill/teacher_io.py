"""What every kind of teacher shares: its batch size, how a batch is split, the main output of
a model, dtype names, and the error for a layer name it does not have."""

from __future__ import annotations

from typing import Any

import torch

from core.errors import InvalidSpec, ModelInvalid

DEFAULT_BATCH = 1024
INPUT_SUFFIX = ":input"  # a feature name ending so means the layer's input
_TORCH_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``"float32"``."""
    return _TORCH_DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def first_tensor(out: Any) -> torch.Tensor:
    """The model's main output when it returns a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise ModelInvalid(f"the model returned {type(out).__name__}, not a tensor")


def chunks(n: int, size: int) -> list[slice]:
    """Slices of ``range(n)`` of at most ``size`` items."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def unknown_layer(name: str, layers: list[str], hint: str = "") -> InvalidSpec:
    """The error for a feature name that the teacher does not have (its layers listed)."""
    shown = ", ".join(layers[:60]) + (" …" if len(layers) > 60 else "")
    return InvalidSpec(
        f"the teacher has no layer '{name}'{hint}; its layers are: {shown} "
        f"(add '{INPUT_SUFFIX}' to a name for that layer's input)",
        field="distillation.hints",
        details={"layers": layers},
    )
