"""Shrink a distilled student: pruning and quantization. The caller evaluates each step again.

Every function returns a new module and leaves its input untouched. The result keeps the
input's ``distill_arch`` and records what was done in ``distill_compression``, e.g.
``{"prune": {"structured": True, "amount": 0.5, ...}, "quantize": "dynamic_int8"}``, which the
exporters read.

Quantization modes:

- ``none``: the model unchanged (a copy).
- ``dynamic_int8``: ``Linear`` and ``LSTM`` weights stored as int8, activations quantized on
  the fly (``torch.ao.quantization.quantize_dynamic``). CPU only; convolutions stay float, so
  it helps MLP and transformer students most. GPT-2's ``Conv1D`` layers (a Linear with its
  weight transposed) become ``nn.Linear`` first so that they are quantized too; a Linear whose
  weight another layer shares (an LM head tied to the embeddings) stays float, since an int8
  copy would add to the float table the embedding still needs.
- ``fp16``: half-precision weights, wrapped in :class:`Float16Model` so that the model still
  takes and returns float32. Runs on CUDA, and on the CPU for the layers torch implements in
  half (Linear, Conv, norms, common activations in torch 2.13); a probe forward on the
  calibration inputs reports anything missing.
- ``static_int8``: weights and activations int8, scales from the calibration inputs (FX graph
  mode, x86 backend). CPU only; needs calibration inputs and a model that FX can trace.

``torch.ao.quantization`` is deprecated in favour of torchao, which is not a dependency here;
it still works in torch 2.13.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from core.errors import CompressionFailed, InvalidSpec

QUANTIZATION_MODES = ("none", "dynamic_int8", "fp16", "static_int8")
_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
_CALIBRATION_BATCH = 128
_CALIBRATION_MAX = 1024


class Float16Model(nn.Module):
    """A half-precision model that takes and returns float32 like the original."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x.half() if x.is_floating_point() else x)
        return out.float()


def _eager_copy(model: nn.Module, what: str) -> nn.Module:
    """A deep copy of an eager module; TorchScript programs cannot be rewritten."""
    if isinstance(model, torch.jit.ScriptModule):
        raise CompressionFailed(
            f"{what} needs an eager PyTorch student (a preset, a safetensors architecture or an "
            "exported program); this student is a TorchScript program, which cannot be "
            f"rewritten; remove '{what}' from compression or choose a preset student"
        )
    return copy.deepcopy(model)


def _tag(result: nn.Module, source: nn.Module, key: str, value: Any) -> nn.Module:
    """Carry ``distill_arch`` over and record this step in ``distill_compression``."""
    arch = getattr(source, "distill_arch", None)
    if arch is not None:
        result.distill_arch = copy.deepcopy(arch)  # type: ignore[assignment]
    record = dict(getattr(source, "distill_compression", None) or {})
    record[key] = value
    result.distill_compression = record  # type: ignore[assignment]
    return result


def weight_sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights over all Linear and Conv layers."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, _PRUNABLE):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: nn.Module, *, amount: float, structured: bool, example_input: torch.Tensor
) -> nn.Module:
    """A pruned copy of ``model``; ``amount`` is the share of weights (or channels) removed.

    Unstructured: global magnitude pruning over every Linear/Conv weight, made permanent, so
    saved weights hold real zeros (the size on disk is unchanged; sparsity is recorded).
    Structured: output channels and hidden units are removed with torch-pruning (magnitude
    importance, dependency graph), keeping the final layer's outputs; the model really gets
    smaller and faster. Its ``distill_arch`` then describes the unpruned shapes and
    ``distill_compression["prune"]["structured"]`` is true: the safetensors exporter stores the
    pruned shapes and :func:`core.distill.export.load_safetensors_student` rebuilds them.
    """
    if not 0 < amount < 1:
        raise InvalidSpec(
            f"prune amount must be between 0 and 1 (exclusive), got {amount}",
            field="compression.prune.amount",
        )
    pruned = _eager_copy(model, "prune").eval()
    before = _parameters(pruned)
    if structured:
        _prune_structured(pruned, amount, example_input)
    else:
        _prune_unstructured(pruned, amount)
    record = {
        "structured": structured,
        "amount": amount,
        "sparsity": round(weight_sparsity(pruned), 6),
        "parameters_before": before,
        "parameters_after": _parameters(pruned),
    }
    return _tag(pruned, model, "prune", record)


def _prune_unstructured(model: nn.Module, amount: float) -> None:
    targets = [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE)]
    if not targets:
        raise CompressionFailed(
            "unstructured pruning found no Linear or Conv layer to prune in this student"
        )
    torch_prune.global_unstructured(
        targets, pruning_method=torch_prune.L1Unstructured, amount=amount
    )
    for module, name in targets:
        torch_prune.remove(module, name)  # bake the mask into the weight: real zeros


def _output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The last Linear/Conv layer to run: its outputs are the model's, so it is kept whole."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, _PRUNABLE)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


def _prune_structured(model: nn.Module, amount: float, example_input: torch.Tensor) -> None:
    import torch_pruning as tp

    device = next(model.parameters()).device
    example = example_input[:2].to(device)
    with torch.no_grad():
        expected_shape = model(example).shape[1:]
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(
                model,
                example,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=amount,
                ignored_layers=_output_layers(model, example),
                num_heads=heads,
            )
            pruner.step()
        with torch.no_grad():
            shape = model(example).shape[1:]
    except Exception as exc:  # torch-pruning raises plain errors on graphs it cannot follow
        raise CompressionFailed(
            f"structured pruning failed on this student ({type(exc).__name__}: {exc}); "
            "use unstructured pruning (structured: false) instead"
        ) from None
    if shape != expected_shape:
        raise CompressionFailed(
            f"structured pruning changed the output shape from {list(expected_shape)} to "
            f"{list(shape)}; use unstructured pruning (structured: false) instead"
        )


def quantize(model: nn.Module, mode: str, *, calibration: torch.Tensor | None = None) -> nn.Module:
    """A quantized copy of ``model`` (see the module docstring for what each mode supports).

    ``calibration``: representative inputs; required by ``static_int8``, used by ``fp16`` as a
    probe forward. int8 results live on the CPU.
    """
    if mode not in QUANTIZATION_MODES:
        raise InvalidSpec(
            f"unknown quantization '{mode}'; use one of {', '.join(QUANTIZATION_MODES)}",
            field="compression.quantize",
        )
    if mode == "none":
        result = _eager_copy(model, "quantize")
    elif mode == "dynamic_int8":
        result = _quantize_dynamic(model, calibration)
    elif mode == "fp16":
        result = _quantize_fp16(model, calibration)
    else:
        result = _quantize_static(model, calibration)
    return _tag(result.eval(), model, "quantize", mode)


def _quantize_dynamic(model: nn.Module, calibration: torch.Tensor | None) -> nn.Module:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    float_model = _eager_copy(model, "quantize").cpu().eval()
    _conv1d_as_linear(float_model)
    tied = _shared_parameters(float_model)
    # nn.TransformerEncoder/DecoderLayer read their Linear weights as tensors on their fast
    # path, which int8 layers do not have: those layers stay float.
    keep_float = {
        f"{name}.{child}" if name else child
        for name, module in float_model.named_modules()
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
        for child, _ in module.named_modules()
        if child
    }
    targets = {
        name: default_dynamic_qconfig
        for name, module in float_model.named_modules()
        if isinstance(module, (nn.Linear, nn.LSTM))
        and type(module).__name__ != "NonDynamicallyQuantizableLinear"
        and name not in keep_float
        and not any(id(p) in tied for p in module.parameters(recurse=False))
    }
    if not targets:
        raise CompressionFailed(
            "dynamic_int8 quantizes Linear (and GPT-2 Conv1D) and LSTM layers and this student "
            "has none outside attention blocks and tied heads; use 'fp16' instead"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(float_model, targets, dtype=torch.qint8)
    if calibration is not None:
        _probe(quantized, calibration[:2].cpu(), "dynamic_int8")
    return quantized


def _conv1d_as_linear(model: nn.Module) -> None:
    """Replace every ``transformers`` ``Conv1D`` (``x @ W + b``, W of shape (in, out)) by the
    ``nn.Linear`` that computes the same (its weight W transposed), in place."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # without transformers there is no Conv1D to convert
        return
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            linear = nn.Linear(n_in, n_out, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            _replace(model, name, linear)


def _shared_parameters(model: nn.Module) -> set[int]:
    """The ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def quantized_parameters(model: nn.Module) -> int:
    """Weights held as int8 by the dynamically quantized Linear layers of ``model``."""
    import torch.ao.nn.quantized.dynamic as nnqd

    return sum(m._weight_bias()[0].numel() for m in model.modules() if isinstance(m, nnqd.Linear))


def _probe(model: nn.Module, x: torch.Tensor, mode: str) -> None:
    """One forward pass, so that a quantized model that cannot run fails here, clearly."""
    try:
        with torch.inference_mode():
            model(x)
    except Exception as exc:
        raise CompressionFailed(
            f"the {mode} student does not run on {x.device} ({type(exc).__name__}: {exc}); "
            "choose another quantization mode"
        ) from None


def _quantize_fp16(model: nn.Module, calibration: torch.Tensor | None) -> nn.Module:
    half = Float16Model(_eager_copy(model, "quantize").eval())
    if calibration is not None:
        device = next(half.parameters()).device
        _probe(half, calibration[:2].to(device), "fp16")
    return half


def _quantize_static(model: nn.Module, calibration: torch.Tensor | None) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if calibration is None or len(calibration) == 0:
        raise CompressionFailed(
            "static_int8 needs calibration inputs to measure activation ranges; "
            "none were given (use 'dynamic_int8', which needs none)"
        )
    float_model = _eager_copy(model, "quantize").cpu().eval()
    samples = calibration[:_CALIBRATION_MAX].cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(float_model, get_default_qconfig_mapping("x86"), (samples[:1],))
            with torch.inference_mode():
                for start in range(0, len(samples), _CALIBRATION_BATCH):
                    prepared(samples[start : start + _CALIBRATION_BATCH])
            quantized = convert_fx(prepared)
            with torch.inference_mode():
                quantized(samples[:2])
    except Exception as exc:  # FX tracing and quantized kernels raise many kinds of errors
        raise CompressionFailed(
            f"static_int8 quantization is not possible for this student "
            f"({type(exc).__name__}: {exc}); use 'dynamic_int8' or 'fp16' instead"
        ) from None
    return quantized


def dequantize(model: nn.Module) -> nn.Module:
    """A float copy of a ``dynamic_int8`` model: each int8 Linear becomes an ``nn.Linear``
    holding its dequantized weights (what the int8 layer multiplies by)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    result = copy.deepcopy(model)
    for name, module in list(result.named_modules()):
        if isinstance(module, nnqd.Linear):
            weight, bias = module._weight_bias()
            linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
            with torch.no_grad():
                linear.weight.copy_(weight.dequantize())
                if bias is not None:
                    linear.bias.copy_(bias)
            _replace(result, name, linear)
        elif isinstance(module, nnqd.LSTM):
            raise CompressionFailed(
                "a dynamically quantized LSTM cannot be turned back into float weights; "
                "export it as torchscript"
            )
    record = dict(getattr(model, "distill_compression", None) or {})
    record.pop("quantize", None)
    result.distill_compression = record  # type: ignore[assignment]
    return result.eval()


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
