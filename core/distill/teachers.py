"""Teachers: frozen models of every accepted format behind one small interface.

:func:`load_teacher` opens a :class:`~core.distill.types.ModelFile`; call it only in a process
that may open untrusted files (a job's child process or the sandbox of
:mod:`core.distill.sandbox`). Every teacher gives

- ``predict(x)``: outputs for a batch without gradients (split into batches internally);
- ``features(x, names)``: the outputs plus named intermediate tensors. A name is a module path
  (``head.1``; ONNX: a tensor name) and means that module's output; ``path:input`` means the
  module's (first) input. :meth:`default_feature_layer` names the input of the final linear
  layer (the penultimate features) and :meth:`describe_layers` lists the names that exist.

Outputs are computed under ``torch.no_grad()`` rather than ``inference_mode`` so that they can
be used as loss targets in a training graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.distill.arch_weights import load_arch_weights
from core.distill.formats import (
    check_exported_program_archive,
    check_onnx_tensors,
    check_torchscript_archive,
)
from core.distill.operators import check_exported_program, check_torchscript
from core.distill.types import ModelFile, Teacher
from core.errors import InvalidSpec, ModelInvalid
from core.spec import ModelInfo, TensorInfo

DEFAULT_BATCH = 1024
# ModuleTeacher on the CPU: larger batches no longer fit the CPU's caches and cost more per
# sample (a small CNN: 145 µs per image at 1024 against 85 µs at 128).
CPU_BATCH = 128
INPUT_SUFFIX = ":input"
_LINEAR_TYPES = ("Linear", "LazyLinear")
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


def _first_tensor(out: Any) -> torch.Tensor:
    """The model's main output when it returns a tuple, list or dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise ModelInvalid(f"the model returned {type(out).__name__}, not a tensor")


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _unknown_layer(name: str, layers: list[str], hint: str = "") -> InvalidSpec:
    shown = ", ".join(layers[:60]) + (" …" if len(layers) > 60 else "")
    return InvalidSpec(
        f"the teacher has no layer '{name}'{hint}; its layers are: {shown} "
        f"(add '{INPUT_SUFFIX}' to a name for that layer's input)",
        field="distillation.hints",
        details={"layers": layers},
    )


class ModuleTeacher:
    """An in-memory ``nn.Module`` as a frozen teacher (tests, built-in architectures, a trained
    assistant that teaches the next stage, and the base of the torch file formats)."""

    def __init__(
        self,
        module: nn.Module,
        info: ModelInfo,
        *,
        size_bytes: int | None = None,
        layer_types: dict[str, str] | None = None,
        batch_size: int | None = None,
    ) -> None:
        module.eval()
        for p in module.parameters():  # ScriptModules lack requires_grad_()
            p.requires_grad_(False)
        self.module = module
        self.info = info
        self.parameters = sum(p.numel() for p in module.parameters())
        self.size_bytes = size_bytes if size_bytes is not None else _state_bytes(module)
        self._layer_types = layer_types
        self.batch_size = batch_size  # None: CPU_BATCH on the CPU, DEFAULT_BATCH elsewhere
        self.device = _module_device(module)

    # --- outputs -------------------------------------------------------------------------------

    def _fixed_batch(self) -> int | None:
        shape = self.info.inputs[0].shape if self.info.inputs else None
        return shape[0] if shape and isinstance(shape[0], int) else None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return _first_tensor(self.module(x))

    def _run(self, x: torch.Tensor, fn: Any) -> Any:
        """Call ``fn`` on batches of ``x`` (padded to a frozen batch size) and concatenate."""
        x = x.to(self.device)
        fixed = self._fixed_batch()
        size = (
            fixed or self.batch_size or (CPU_BATCH if self.device.type == "cpu" else DEFAULT_BATCH)
        )
        if len(x) == 0 or (len(x) <= size and fixed in (None, len(x))):
            return fn(x)  # one batch: nothing to split or concatenate
        parts = []
        for sl in _chunks(len(x), size):
            xb = x[sl]
            if fixed is not None and len(xb) < fixed:
                pad = xb.new_zeros((fixed - len(xb), *xb.shape[1:]))
                out = fn(torch.cat([xb, pad]))
                out = _map_tensors(out, lambda t, n=len(xb): t[:n])
            else:
                out = fn(xb)
            parts.append(out)
        return _concat(parts)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x`` (logits for a classifier), without gradients."""
        with torch.no_grad():
            return self._run(x, self._forward)

    # --- features ------------------------------------------------------------------------------

    def layer_types(self) -> dict[str, str]:
        """Module path → class name, in definition order ('' is the root)."""
        if self._layer_types is not None:
            return dict(self._layer_types)
        return {
            name: getattr(m, "original_name", type(m).__name__)
            for name, m in self.module.named_modules()
            if name
        }

    def describe_layers(self) -> list[str]:
        """The module paths that :meth:`features` accepts."""
        return list(self.layer_types())

    def default_feature_layer(self) -> str | None:
        """The input of the final linear layer (the penultimate features), if there is one;
        a built-in architecture's declared ``penultimate`` layer first."""
        declared = getattr(self.module, "penultimate", None)
        if isinstance(declared, str):
            return declared
        linears = [n for n, t in self.layer_types().items() if t in _LINEAR_TYPES]
        return f"{linears[-1]}{INPUT_SUFFIX}" if linears else None

    def features(
        self, x: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outputs plus the named modules' outputs (``path:input``: their inputs)."""
        layers = set(self.describe_layers())
        for name in names:
            if name.removesuffix(INPUT_SUFFIX) not in layers:
                raise _unknown_layer(name, self.describe_layers())

        def forward(xb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            captured: dict[str, torch.Tensor] = {}
            handles = []
            for name in names:
                path = name.removesuffix(INPUT_SUFFIX)
                want_input = name.endswith(INPUT_SUFFIX)

                def hook(_m: nn.Module, inp: Any, out: Any, name=name, want_input=want_input):
                    captured[name] = _first_tensor(inp if want_input else out)

                handles.append(self.module.get_submodule(path).register_forward_hook(hook))
            try:
                out = self._forward(xb)
            finally:
                for h in handles:
                    h.remove()
            missing = [n for n in names if n not in captured]
            if missing:
                raise InvalidSpec(
                    f"the teacher's layers {missing} do not run in its forward pass; "
                    "choose other layers",
                    field="distillation.hints",
                )
            return out, captured

        with torch.no_grad():
            return self._run(x, forward)

    def to(self, device: torch.device | str) -> ModuleTeacher:
        self.module.to(device)
        self.device = torch.device(device)
        return self


class TorchScriptTeacher(ModuleTeacher):
    """A ``torch.jit.load`` module: outputs only (TorchScript has no forward hooks)."""

    def features(
        self, x: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not names:
            return self.predict(x), {}
        raise InvalidSpec(
            "a TorchScript teacher cannot give intermediate features; upload the teacher as an "
            "exported_program (torch.export.save) for feature-based methods (fitnet, attention, "
            "rkd), or use an output method (kd, dkd, mse)",
            field="distillation.method",
        )


class OnnxTeacher:
    """An ONNX model run by onnxruntime; features are extra graph outputs named by tensor."""

    def __init__(
        self, path: Path, device: torch.device | str = "cpu", batch_size: int = DEFAULT_BATCH
    ) -> None:
        import onnx

        self.model = onnx.load(str(path), load_external_data=False)
        check_onnx_tensors(self.model)  # again in jobs: the file may predate the upload check
        self.batch_size = batch_size
        self.size_bytes = Path(path).stat().st_size
        graph = self.model.graph
        self.parameters = _onnx_parameters(self.model)
        init_names = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in init_names]
        if len(inputs) != 1:
            raise ModelInvalid(
                f"the ONNX model has {len(inputs)} inputs ({[i.name for i in inputs]}); a teacher "
                "takes exactly one input tensor"
            )
        self.input_name = inputs[0].name
        self._sessions: dict[tuple[str, ...], Any] = {}
        self.device = torch.device(device)
        session = self._session(())
        self.input_dtype = _ORT_NUMPY.get(session.get_inputs()[0].type, np.float32)
        self.score_output, self._zipmap = _score_output(session)
        self.info = self._info()

    def _providers(self) -> list[str]:
        import onnxruntime as ort

        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, extra: tuple[str, ...]) -> Any:
        import onnx
        import onnxruntime as ort

        if extra not in self._sessions:
            model = self.model
            if extra:
                model = onnx.ModelProto()
                model.CopyFrom(self.model)
                present = {o.name for o in model.graph.output}
                for name in extra:
                    if name not in present:
                        model.graph.output.append(onnx.ValueInfoProto(name=name))
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self._sessions[extra] = ort.InferenceSession(
                model.SerializeToString(), options, providers=self._providers()
            )
        return self._sessions[extra]

    def _info(self) -> ModelInfo:
        graph = self.model.graph
        inp = next(i for i in graph.input if i.name == self.input_name)
        outputs = sorted(graph.output, key=lambda o: o.name != self.score_output)
        out_infos = [_onnx_tensor_info(o) for o in outputs]
        if self._zipmap:
            out_infos[0] = TensorInfo(shape=[None, None], dtype="float32")
        return ModelInfo(
            format="onnx",
            inputs=[_onnx_tensor_info(inp)],
            outputs=out_infos,
            has_default_features=self.default_feature_layer() is not None,
        )

    def _fixed_batch(self) -> int | None:
        shape = self.info.inputs[0].shape
        return shape[0] if shape and isinstance(shape[0], int) else None

    def _run_numpy(self, x: torch.Tensor, names: tuple[str, ...]) -> list[np.ndarray]:
        arr = x.detach().cpu().numpy().astype(self.input_dtype, copy=False)
        if len(arr) == 0:
            raise ModelInvalid("predict got an empty batch; pass at least one sample")
        fixed = self._fixed_batch()
        size = fixed or self.batch_size
        session = self._session(names)
        wanted = [self.score_output, *[n for n in names if n != self.input_name]]
        parts: list[list[np.ndarray]] = []
        for sl in _chunks(len(arr), size):
            xb = arr[sl]
            n = len(xb)
            if fixed is not None and n < fixed:
                xb = np.concatenate([xb, np.zeros((fixed - n, *xb.shape[1:]), xb.dtype)])
            outs = session.run(wanted, {self.input_name: xb})
            if self._zipmap:
                outs[0] = _zipmap_to_array(outs[0])
            parts.append([np.asarray(o)[:n] for o in outs])
        joined = [np.concatenate([p[i] for p in parts]) for i in range(len(wanted))]
        by_name = dict(zip(wanted, joined, strict=True))
        if self.input_name in names:
            by_name[self.input_name] = arr
        return [by_name[self.score_output], *[by_name[n] for n in names]]

    def _scores(self, raw: np.ndarray) -> torch.Tensor:
        out = torch.from_numpy(np.ascontiguousarray(raw)).float()
        if _is_probabilities(out):
            # Classifiers exported with a softmax (or skl2onnx's predict_proba) give
            # probabilities; log-probabilities are logits up to a constant per row.
            out = out.clamp_min(1e-7).log()
        return out.to(self.device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Scores for ``x`` (logits, or log-probabilities for a probability output)."""
        return self._scores(self._run_numpy(x, ())[0])

    def describe_layers(self) -> list[str]:
        """Tensor names that :meth:`features` accepts (graph input and node outputs)."""
        names = [self.input_name]
        for node in self.model.graph.node:
            names.extend(o for o in node.output if o)
        return names

    def default_feature_layer(self) -> str | None:
        """The input tensor of the last Gemm/MatMul node (the penultimate features)."""
        for node in reversed(self.model.graph.node):
            if node.op_type in ("Gemm", "MatMul") and node.input:
                return node.input[0]
        return None

    def features(
        self, x: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores plus the named intermediate tensors (extra outputs of a copy of the graph)."""
        layers = self.describe_layers()
        known = set(layers)
        for name in names:
            if name not in known:
                raise _unknown_layer(name, layers, " (ONNX teachers name tensors)")
        outs = self._run_numpy(x, tuple(names))
        feats = {
            n: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
            for n, a in zip(names, outs[1:], strict=True)
        }
        return self._scores(outs[0]), feats

    def to(self, device: torch.device | str) -> OnnxTeacher:
        device = torch.device(device)
        if device.type != self.device.type:
            self._sessions.clear()
        self.device = device
        return self


class EnsembleTeacher:
    """A weighted average of teachers' outputs.

    For classification the members' log-softmax outputs are averaged (a weighted geometric mean
    of their probabilities, returned as log-probabilities); for regression the raw outputs are.
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        weights: Sequence[float] | None = None,
        task: str = "classification",
    ) -> None:
        if not teachers:
            raise InvalidSpec("an ensemble needs at least one teacher", field="teachers")
        weights = list(weights) if weights is not None else [1.0] * len(teachers)
        if len(weights) != len(teachers) or any(w <= 0 for w in weights):
            raise InvalidSpec("give one positive weight per teacher", field="teachers")
        total = sum(weights)
        self.teachers = list(teachers)
        self.weights = [w / total for w in weights]
        self.task = task
        self.info = teachers[0].info
        self.parameters = sum(t.parameters for t in teachers)
        self.size_bytes = sum(t.size_bytes for t in teachers)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for teacher, w in zip(self.teachers, self.weights, strict=True):
            y = teacher.predict(x).float()
            if self.task == "classification":
                y = torch.log_softmax(y, dim=-1)
            out = w * y if out is None else out + w * y.to(out.device)
        assert out is not None
        return out

    def features(
        self, x: torch.Tensor, names: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not names:
            return self.predict(x), {}
        raise InvalidSpec(
            "feature-based methods need a single teacher; use kd, dkd or mse with an ensemble",
            field="distillation.method",
        )

    def describe_layers(self) -> list[str]:
        return []

    def default_feature_layer(self) -> str | None:
        return None

    def to(self, device: torch.device | str) -> EnsembleTeacher:
        self.teachers = [t.to(torch.device(device)) for t in self.teachers]
        return self


# --- loading -----------------------------------------------------------------------------------


def load_teacher(
    file: ModelFile,
    device: torch.device | str = "cpu",
    input_shape: Sequence[int | None] | None = None,
) -> Teacher:
    """Open a model file as a frozen teacher on ``device`` (run only where untrusted files may be
    opened). ``input_shape`` (one sample's shape) helps TorchScript files declare their input."""
    device = torch.device(device)
    loaders = {
        "exported_program": _load_exported_program,
        "torchscript": _load_torchscript,
        "onnx": lambda f, d, s: OnnxTeacher(f.path, d),
        "safetensors": _load_safetensors,
        "hf": _load_hf,
    }
    if file.format not in loaders:
        raise ModelInvalid(
            f"unknown model format '{file.format}'; accepted: {', '.join(sorted(loaders))}"
        )
    teacher: Teacher = loaders[file.format](file, device, input_shape)
    probe_outputs(teacher)
    return teacher


def _load_hf(file: ModelFile, device: torch.device, input_shape: Any) -> Teacher:
    from core.distill.hf.models import load_hf_teacher

    return load_hf_teacher(file, device)


def _load_exported_program(
    file: ModelFile, device: torch.device, input_shape: Sequence[int | None] | None
) -> ModuleTeacher:
    check_exported_program_archive(file.path)
    try:
        ep = torch.export.load(str(file.path))
    except Exception as exc:  # torch raises many types for a damaged archive
        raise ModelInvalid(f"the torch.export archive cannot be loaded: {exc}") from None
    check_exported_program(ep)  # before anything runs the graph
    inputs = [
        _fake_info(n.meta.get("val"))
        for n in ep.graph.nodes
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
    ]
    if len(inputs) != 1:
        raise ModelInvalid(
            f"the exported program takes {len(inputs)} inputs; a teacher takes exactly one tensor"
        )
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = [_fake_info(getattr(a, "meta", {}).get("val")) for a in output_node.args[0]]
    layer_types: dict[str, str] = {}
    for node in ep.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if path and path not in layer_types:
                cls = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
                layer_types[path] = cls.rsplit(".", 1)[-1]
    module = torch.export.unflatten(ep)
    info = ModelInfo(
        format="exported_program", inputs=inputs, outputs=outputs or _unknown_out(), trainable=True
    )
    order = {name: i for i, (name, _) in enumerate(module.named_modules())}
    layer_types = dict(sorted(layer_types.items(), key=lambda kv: order.get(kv[0], len(order))))
    teacher = ModuleTeacher(
        module, info, size_bytes=file.path.stat().st_size, layer_types=layer_types
    )
    return teacher.to(device)


def _load_torchscript(
    file: ModelFile, device: torch.device, input_shape: Sequence[int | None] | None
) -> TorchScriptTeacher:
    check_torchscript_archive(file.path)
    try:
        module = torch.jit.load(str(file.path), map_location=device)
    except Exception as exc:
        raise ModelInvalid(f"the TorchScript archive cannot be loaded: {exc}") from None
    check_torchscript(module)  # before anything runs the module
    info = ModelInfo(
        format="torchscript",
        inputs=[input_info(module, input_shape)],
        outputs=_unknown_out(),
        trainable=True,
    )
    teacher = TorchScriptTeacher(module, info, size_bytes=file.path.stat().st_size)
    teacher.device = device
    return teacher


def _load_safetensors(
    file: ModelFile, device: torch.device, input_shape: Sequence[int | None] | None
) -> ModuleTeacher:
    loaded = load_arch_weights(file)
    model, arch, config = loaded.model, loaded.arch, loaded.config
    # The presets take the sample shape as ``input_shape`` (token models: ``tokens=True``).
    declared = config.get("input_shape") or getattr(model, "input_shape", None)
    inp = input_info(model, input_shape or declared)
    if config.get("tokens"):
        inp = TensorInfo(shape=inp.shape, dtype="int64")
    info = ModelInfo(
        format="safetensors",
        inputs=[inp],
        outputs=_unknown_out(),
        trainable=True,
        arch=arch,
    )
    teacher = ModuleTeacher(model, info, size_bytes=file.path.stat().st_size)
    teacher.arch_config = dict(config)  # type: ignore[attr-defined]
    return teacher.to(device)


# --- signatures --------------------------------------------------------------------------------


def input_info(module: nn.Module, sample_shape: Sequence[int | None] | None = None) -> TensorInfo:
    """The input of a module: ``sample_shape`` (one sample, no batch) when given, else guessed
    from its first layer (Linear: [N, in]; ConvNd: [N, C, None…]; Embedding: int64 tokens)."""
    if sample_shape is not None:
        dims = list(sample_shape)
        if dims and dims[0] is None:
            dims = dims[1:]  # a leading batch dimension was included
        return TensorInfo(shape=[None, *dims], dtype="float32")
    for _, m in module.named_modules():
        kind = getattr(m, "original_name", type(m).__name__)
        if kind in ("Linear", "Bilinear") and hasattr(m, "in_features"):
            return TensorInfo(shape=[None, int(m.in_features)], dtype="float32")
        if kind in ("Conv1d", "Conv2d", "Conv3d") and hasattr(m, "in_channels"):
            spatial = int(kind[4])
            return TensorInfo(shape=[None, int(m.in_channels), *[None] * spatial], dtype="float32")
        if kind == "Embedding":
            return TensorInfo(shape=[None, None], dtype="int64")
    return TensorInfo(shape=None, dtype="float32")


def probe_outputs(teacher: Teacher, batch: int = 2) -> bool:
    """Run one forward on a probe input when the input shape is fully known, and record the
    output shapes (batch dimension as None) in ``teacher.info``. Returns whether it ran."""
    inp = teacher.info.inputs[0] if teacher.info.inputs else None
    if inp is None or inp.shape is None or any(d is None for d in inp.shape[1:]):
        return False
    dims = [int(d) for d in inp.shape[1:]]
    n = inp.shape[0] if isinstance(inp.shape[0], int) else batch
    if inp.dtype.startswith("int"):
        x = torch.ones((n, *dims), dtype=torch.long)
    else:
        x = torch.rand((n, *dims), generator=torch.Generator().manual_seed(0))
    try:
        out = teacher.predict(x)
    except (InvalidSpec, ModelInvalid):
        raise
    except Exception as exc:  # any failure of the user's model
        if "can't allocate memory" in str(exc):
            raise MemoryError(str(exc)) from None
        raise ModelInvalid(
            f"a dry forward on a probe input of shape {[n, *dims]} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    first = TensorInfo(shape=[None, *out.shape[1:]], dtype=dtype_name(out.dtype))
    teacher.info = teacher.info.model_copy(update={"outputs": [first, *teacher.info.outputs[1:]]})
    return True


def _unknown_out() -> list[TensorInfo]:
    return [TensorInfo(shape=None, dtype="float32")]


def _fake_info(val: Any) -> TensorInfo:
    if not isinstance(val, torch.Tensor):
        return TensorInfo(shape=None, dtype="float32")
    shape = [int(d) if isinstance(d, int) else None for d in val.shape]
    return TensorInfo(shape=shape, dtype=dtype_name(val.dtype))


_ORT_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _onnx_tensor_info(value: Any) -> TensorInfo:
    from onnx.helper import tensor_dtype_to_np_dtype

    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return TensorInfo(shape=None, dtype="float32")
    dtype = str(tensor_dtype_to_np_dtype(ttype.elem_type)) if ttype.elem_type else "float32"
    if not ttype.HasField("shape"):
        return TensorInfo(shape=None, dtype=dtype)
    shape = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in ttype.shape.dim
    ]
    return TensorInfo(shape=shape, dtype=dtype)


def _onnx_parameters(model: Any) -> int:
    """Elements of the initializers, Constant tensors and ai.onnx.ml weight attributes
    (skl2onnx keeps a linear model's coefficients in node attributes)."""
    from onnx import AttributeProto

    total = sum(math.prod(t.dims) for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                total += math.prod(attr.t.dims)
            elif attr.type == AttributeProto.FLOATS and node.domain == "ai.onnx.ml":
                total += len(attr.floats)
    return total


def _score_output(session: Any) -> tuple[str, bool]:
    """The output holding scores: a float tensor of shape (N, k), else a ZipMap of scores."""
    outs = session.get_outputs()
    floats = [o for o in outs if o.type in ("tensor(float)", "tensor(double)", "tensor(float16)")]
    for o in floats:
        if len(o.shape) == 2:
            return o.name, False
    if floats:
        return floats[0].name, False
    for o in outs:
        if o.type.startswith("seq(map("):
            return o.name, True
    raise ModelInvalid(
        f"the ONNX model has no float output to learn from (outputs: "
        f"{[(o.name, o.type) for o in outs]})"
    )


def _zipmap_to_array(rows: list[dict[Any, float]]) -> np.ndarray:
    """skl2onnx's ZipMap output (one {class: probability} dict per row) as an (N, k) array."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    keys = sorted(rows[0])
    return np.array([[row[k] for k in keys] for row in rows], dtype=np.float32)


def _is_probabilities(out: torch.Tensor) -> bool:
    if out.ndim != 2 or out.shape[1] < 2 or len(out) == 0:
        return False
    return bool((out >= 0).all()) and bool(
        torch.allclose(out.sum(1), out.new_ones(len(out)), atol=1e-3)
    )


def _state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _map_tensors(out: Any, fn: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple):
        return tuple(_map_tensors(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_tensors(v, fn) for k, v in out.items()}
    return out


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    return first
