"""What users download: the student as TorchScript, ONNX and safetensors, and the job report.

Every writer puts its file under a temporary name beside the target, checks it by loading it
back, and renames it into place only then: a failed or interrupted export leaves nothing behind.

Compressed students:

- TorchScript holds any student, int8 and fp16 included.
- ONNX: a ``dynamic_int8`` student cannot be exported op for op (torch has no ONNX form of its
  int8 layers), so its dequantized float graph is exported and then quantized with
  onnxruntime's ``quantize_dynamic`` (int8 MatMul/Gemm weights). An ``fp16`` student's graph
  stores float16 weights but computes in float32 (onnxruntime's float16 CPU kernels are
  incomplete), taking and returning float32 like the torch student. int8 and fp16 graphs are
  checked against the torch student with a tolerance widened to a share of the output range
  (:data:`QUANTIZED_RTOL`, :data:`FP16_RTOL`), since two runtimes round differently.
- safetensors stores float weights of a built-in architecture: a ``dynamic_int8`` student is
  stored dequantized (``distill_quantization`` in the metadata says so; load it and quantize
  again for int8 speed), an ``fp16`` student as float16 tensors; ``static_int8`` has no float
  form and is refused. A structurally pruned student stores its pruned shapes, which
  :func:`load_safetensors_student` restores.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import stat
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ExportFailed, ModelInvalid

ONNX_OPSET = 17
SAFETENSORS_FORMAT_VERSION = 1
QUANTIZED_RTOL = 0.1  # int8 graphs: allowed difference as a share of the largest output
FP16_RTOL = 1e-2
_RELOAD_ATOL = 1e-4
_FP16_MIN_ELEMENTS = 16  # smaller float constants stay float32


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on the CPU (a copy when it lives elsewhere); mode restored."""
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    target = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = target.training
    target.eval()
    try:
        yield target
    finally:
        target.train(was_training)


def _quantization(model: nn.Module) -> str:
    """The quantization mode a model is in, read from its layers."""
    from core.distill.compress import Float16Model

    if isinstance(model, Float16Model):
        return "fp16"
    kinds = {type(m).__module__ for m in model.modules()}
    if any(k.startswith("torch.ao.nn.quantized.dynamic") for k in kinds):
        return "dynamic_int8"
    if any(
        k.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")) for k in kinds
    ):
        return "static_int8"
    return "none"


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from core.distill.evaluate import output_tensor

    with torch.inference_mode():
        return output_tensor(model(x)).detach().float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ExportFailed(f"the exported model returns shape {list(a.shape)}, not {list(b.shape)}")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save the model as TorchScript (scripted, or traced on ``example`` when scripting fails),
    reload it with ``torch.jit.load`` and check that it gives the same outputs."""
    with _eval_on_cpu(model) as target, warnings.catch_warnings(action="ignore"):
        example = example.cpu()
        try:
            program = torch.jit.script(target)
        except Exception:
            try:
                program = torch.jit.trace(target, example[:1], check_trace=False)
            except Exception as exc:
                raise ExportFailed(
                    f"the student cannot be saved as TorchScript: scripting and tracing failed "
                    f"({type(exc).__name__}: {exc}); export it as onnx or safetensors instead"
                ) from None
        arch = getattr(model, "distill_arch", None)
        extra = {"distill_arch.json": json.dumps(arch)} if arch else {}
        with _atomic(Path(path)) as tmp:
            torch.jit.save(program, str(tmp), _extra_files=extra)
            diff = _max_diff(_run(torch.jit.load(str(tmp)), example), _run(target, example))
            if not diff <= _RELOAD_ATOL:
                raise ExportFailed(
                    f"the reloaded TorchScript student differs from the trained one by {diff:.3g}"
                )


def _onnx_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=ONNX_OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        do_constant_folding=True,
    )


def _onnx_quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a pre-processing hint on every call
    try:
        # reduce_range: 7-bit weights. On x86 CPUs without VNNI, onnxruntime's u8s8 kernels
        # add pairs of products in 16 bits, which saturate with full-range weights; the file
        # runs wherever the user deploys it, so it must be exact on those CPUs too.
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            reduce_range=True,
        )
    finally:
        root.setLevel(level)


def _onnx_weights_to_fp16(path: Path) -> None:
    """Store a float32 graph's weights as float16, cast back to float32 where they are used.

    onnxruntime's CPU kernels for float16 compute are incomplete (some graphs even crash it when
    loaded), so an fp16 student's ONNX form keeps float32 compute and halves the file.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        if array.size < _FP16_MIN_ELEMENTS:
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    check_inputs: torch.Tensor,
    tolerance: float = 1e-3,
) -> dict[str, Any]:
    """Save a single-file ONNX graph (opset 17, dynamic batch axis, input ``input``, output
    ``output``) and check it with onnxruntime against the torch model on ``check_inputs``.

    Returns ``{"max_abs_diff", "opset", "tolerance", "quantization"}``; raises ExportFailed
    when the difference exceeds the tolerance (widened for int8 and fp16, see the module doc).
    """
    import onnxruntime as ort

    from core.distill.compress import Float16Model, dequantize

    mode = _quantization(model)
    with _eval_on_cpu(model) as target, warnings.catch_warnings(action="ignore"):
        example, check_inputs = example[:1].cpu(), check_inputs.cpu()
        reference = _run(target, check_inputs)
        with _atomic(Path(path)) as tmp:
            try:
                if mode == "dynamic_int8":
                    float_tmp = tmp.with_name(tmp.name + ".float.onnx")
                    try:
                        _onnx_export(dequantize(target), example, float_tmp)
                        _onnx_quantize_dynamic(float_tmp, tmp)
                    finally:
                        float_tmp.unlink(missing_ok=True)
                elif isinstance(target, Float16Model):
                    _onnx_export(copy.deepcopy(target.inner).float(), example, tmp)
                    _onnx_weights_to_fp16(tmp)
                else:
                    _onnx_export(target, example, tmp)
                session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
                name = session.get_inputs()[0].name
                got = session.run(None, {name: check_inputs.numpy()})[0]
            except ExportFailed:
                raise
            except Exception as exc:
                raise ExportFailed(
                    f"the student cannot be exported to ONNX ({type(exc).__name__}: "
                    f"{str(exc)[:500]}); export it as torchscript instead"
                ) from None
            diff = _max_diff(torch.from_numpy(np.asarray(got)), reference)
            scale = float(reference.abs().max()) if reference.numel() else 0.0
            rtol = {"dynamic_int8": QUANTIZED_RTOL, "static_int8": QUANTIZED_RTOL}.get(mode, 0.0)
            rtol = FP16_RTOL if mode == "fp16" else rtol
            allowed = max(tolerance, rtol * scale)
            if not diff <= allowed:
                raise ExportFailed(
                    f"the ONNX student's outputs differ from the torch student's by {diff:.3g} "
                    f"(allowed {allowed:.3g}) on {len(check_inputs)} inputs; "
                    "export it as torchscript instead",
                    details={"max_abs_diff": diff, "tolerance": allowed},
                )
    return {"max_abs_diff": diff, "opset": ONNX_OPSET, "tolerance": allowed, "quantization": mode}


def _stored_form(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """What safetensors holds for ``model``: (the module computing it, the module whose weights
    are stored, the quantization it came from)."""
    from core.distill.compress import Float16Model, dequantize

    mode = _quantization(model)
    if mode == "static_int8":
        raise ExportFailed(
            "a static_int8 student has no float weights to store as safetensors; export it as "
            "torchscript or onnx, or quantize 'dynamic_int8' or 'fp16' instead"
        )
    computing = dequantize(model) if mode == "dynamic_int8" else model
    stored = computing.inner if isinstance(computing, Float16Model) else computing
    return computing, stored, mode


def _reshaped(arch: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the weights have other shapes than the architecture builds (structured pruning);
    ExportFailed when they are not that architecture's weights at all."""
    from core.distill.architectures import build_architecture
    from core.errors import InvalidSpec

    try:
        fresh = build_architecture(arch["name"], arch.get("config") or {}).state_dict()
    except InvalidSpec as exc:
        raise ExportFailed(
            f"the student's architecture cannot be rebuilt ({exc.message}); "
            "export it as torchscript or onnx instead"
        ) from None
    if fresh.keys() != tensors.keys():
        odd = sorted(set(fresh) ^ set(tensors))[:10]
        raise ExportFailed(
            f"the student's weights do not match architecture '{arch['name']}' (keys {odd}); "
            "export it as torchscript or onnx instead"
        )
    return any(fresh[key].shape != value.shape for key, value in tensors.items())


def arch_json_path(weights: Path) -> Path:
    """``student.safetensors`` → ``student.arch.json`` (the file that rebuilds it)."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}.arch.json")


def export_safetensors(
    model: nn.Module,
    path: Path,
    arch_path: Path | None = None,
    *,
    example: torch.Tensor | None = None,
) -> Path:
    """Save the weights as safetensors plus the architecture JSON (``arch_path``, by default
    ``<stem>.arch.json`` beside the weights); return the JSON's path.

    The metadata holds ``distill_arch`` (the name), ``distill_arch_config`` (JSON) and, where
    they apply, ``distill_pruned`` and ``distill_quantization``; the JSON holds ``name``,
    ``config`` and ``format_version`` for :func:`core.distill.architectures.build_architecture`.
    With ``example``, the files are loaded back with :func:`load_safetensors_student` and their
    outputs compared first (do pass it for structurally pruned students).
    """
    from safetensors.torch import save_file

    arch = getattr(model, "distill_arch", None)
    if not arch:
        raise ExportFailed(
            "safetensors stores the weights of a built-in architecture, and this student is not "
            "one (it was uploaded as a program); export it as torchscript or onnx instead"
        )
    computing, stored, mode = _stored_form(model)
    tensors = {
        key: value.detach().cpu().contiguous().clone()  # shared storage breaks safetensors
        for key, value in stored.state_dict().items()
        if isinstance(value, torch.Tensor)
    }
    pruned = _reshaped(arch, tensors)
    description = {
        "name": arch["name"],
        "config": arch.get("config") or {},
        "format_version": SAFETENSORS_FORMAT_VERSION,
        "pruned": pruned,
        "quantization": mode,
    }
    metadata = {
        "format": "pt",
        "distill_arch": str(arch["name"]),
        "distill_arch_config": json.dumps(description["config"], sort_keys=True),
        "distill_format_version": str(SAFETENSORS_FORMAT_VERSION),
    }
    if pruned:
        metadata["distill_pruned"] = "structured"
    if mode != "none":
        metadata["distill_quantization"] = mode
        if mode == "dynamic_int8":
            metadata["distill_note"] = "int8 weights stored dequantized as float32"
    json_path = Path(arch_path) if arch_path is not None else arch_json_path(Path(path))
    with _atomic(Path(path)) as tmp_weights, _atomic(json_path) as tmp_json:
        save_file(tensors, str(tmp_weights), metadata=metadata)
        tmp_json.write_text(json.dumps(description, indent=2))
        # safetensors creates its file private (0600); give it the mode of an ordinary file.
        os.chmod(tmp_weights, stat.S_IMODE(tmp_json.stat().st_mode))
        if example is not None:
            rebuilt = load_safetensors_student(tmp_weights, tmp_json)
            with _eval_on_cpu(computing) as target:
                want = _run(target, example.cpu())
            diff = _max_diff(_run(rebuilt, example.cpu()), want)
            if not diff <= _RELOAD_ATOL:
                raise ExportFailed(
                    f"the student rebuilt from safetensors differs from the trained one by "
                    f"{diff:.3g}; export it as torchscript or onnx instead"
                )
    return json_path


def load_safetensors_student(weights: Path, arch_path: Path | None = None) -> nn.Module:
    """Rebuild a student saved by :func:`export_safetensors` (eval mode, on the CPU).

    Builds the architecture from the JSON beside the weights, gives structurally pruned layers
    their stored shapes, loads the weights and, for ``fp16``, wraps it to take float32 inputs.
    """
    from safetensors.torch import load_file

    from core.distill.arch_weights import load_weights
    from core.distill.architectures import build_architecture
    from core.distill.compress import Float16Model

    weights = Path(weights)
    arch_path = Path(arch_path) if arch_path is not None else arch_json_path(weights)
    try:
        description = json.loads(arch_path.read_text())
        name, config = description["name"], description.get("config") or {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelInvalid(
            f"cannot read the architecture file {arch_path.name} ({exc}); it must be the JSON "
            'written beside the weights: {"name": ..., "config": {...}}'
        ) from None
    state = load_file(str(weights))
    model = build_architecture(name, config)
    if description.get("pruned"):
        _fit_shapes(model, state)
    if description.get("quantization") == "fp16":
        model = Float16Model(model)
        state = {f"inner.{k}": v for k, v in state.items()}
    load_weights(model, state, name, config)
    model.distill_arch = {"name": name, "config": config}  # type: ignore[assignment]
    return model.eval()


def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize parameters and buffers (and the size attributes of standard layers) to the shapes
    stored in ``state``: how a structurally pruned student is rebuilt from its full config."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        changed = False
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for key, value in list(tensors.items()):
                stored = state.get(prefix + key)
                if value is None or stored is None or stored.shape == value.shape:
                    continue
                new = torch.empty(stored.shape, dtype=value.dtype)
                if kind == "_parameters":
                    new = nn.Parameter(new, value.requires_grad)
                tensors[key] = new
                changed = True
        if changed:
            _fix_size_attributes(module)


def _fix_size_attributes(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = len(module.running_mean if module.weight is None else module.weight)
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape


def _jsonable(value: Any) -> Any:
    """Plain JSON values: tensors and numpy to lists and numbers, NaN and inf to null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic | np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def student_io(
    x: torch.Tensor, outputs: torch.Tensor, task: str, class_names: list[str] | None = None
) -> dict[str, Any]:
    """How to call the exported student: its input and output as the ONNX file names them,
    with the batch dimension ``None``, and what the input must be prepared like (the ``x`` the
    job trained on: its value range is the quickest check of a missing scaling step)."""
    dtype = str(x.dtype).removeprefix("torch.")
    contract: dict[str, Any] = {
        "name": "input",
        "shape": [None, *x.shape[1:]],
        "dtype": dtype,
        "preprocessing": (
            "prepare inputs exactly as the transfer set's x was prepared (same scaling, layout "
            "and dtype); the student applies nothing else"
        ),
    }
    if x.is_floating_point() and x.numel():
        values = x.float()
        contract["x_range"] = [round(float(values.min()), 6), round(float(values.max()), 6)]
        contract["x_mean"] = round(float(values.mean()), 6)
    output: dict[str, Any] = {"name": "output", "shape": [None, *outputs.shape[1:]]}
    if task == "classification":
        output["meaning"] = "one score (logit) per class; argmax is the predicted class"
        if class_names:
            output["classes"] = list(class_names)
    else:
        output["meaning"] = "the predicted target values"
    return {"input": contract, "output": output}


def write_report(
    path: Path, result: dict[str, Any], history: list[dict[str, Any]], spec: dict[str, Any]
) -> None:
    """Write ``report.json``: ``{"result", "history", "spec"}``, indented, written atomically."""
    body = {"result": result, "history": history, "spec": spec}
    text = json.dumps(_jsonable(body), indent=2, allow_nan=False)
    with _atomic(Path(path)) as tmp:
        tmp.write_text(text + "\n")
