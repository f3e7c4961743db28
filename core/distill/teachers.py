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
be used as loss targets in a training graph. The ONNX teacher is in
:mod:`core.distill.onnx_teacher`; what every teacher shares, in :mod:`core.distill.teacher_io`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import core.distill.architectures  # noqa: F401 - registers the presets a teacher's weights may name
from core.distill.arch_weights import load_arch_weights
from core.distill.formats import check_exported_program_archive, check_torchscript_archive
from core.distill.operators import check_exported_program, check_torchscript
from core.distill.teacher_io import (
    DEFAULT_BATCH,
    INPUT_SUFFIX,
    chunks,
    dtype_name,
    first_tensor,
    unknown_layer,
)
from core.distill.types import ModelFile, Teacher
from core.errors import InvalidSpec, ModelInvalid
from core.spec import ModelInfo, TensorInfo

# ModuleTeacher on the CPU: larger batches no longer fit the CPU's caches and cost more per
# sample (a small CNN: 145 µs per image at 1024 against 85 µs at 128).
CPU_BATCH = 128
_LINEAR_TYPES = ("Linear", "LazyLinear")


def _outputs_only(
    teacher: Teacher, x: torch.Tensor, names: list[str], refusal: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``features`` of a teacher that has no intermediate features: its outputs when no names
    are asked for, else InvalidSpec with ``refusal``."""
    if not names:
        return teacher.predict(x), {}
    raise InvalidSpec(refusal, field="distillation.method")


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
        return first_tensor(self.module(x))

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
        for sl in chunks(len(x), size):
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
                raise unknown_layer(name, self.describe_layers())

        def forward(xb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            captured: dict[str, torch.Tensor] = {}
            handles = []
            for name in names:
                path = name.removesuffix(INPUT_SUFFIX)
                want_input = name.endswith(INPUT_SUFFIX)

                def hook(_m: nn.Module, inp: Any, out: Any, name=name, want_input=want_input):
                    captured[name] = first_tensor(inp if want_input else out)

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
        return _outputs_only(
            self, x, names,
            "a TorchScript teacher cannot give intermediate features; upload the teacher as an "
            "exported_program (torch.export.save) for feature-based methods (fitnet, attention, "
            "rkd), or use an output method (kd, dkd, mse)",
        )  # fmt: skip


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
        return _outputs_only(
            self, x, names,
            "feature-based methods need a single teacher; use kd, dkd or mse with an ensemble",
        )  # fmt: skip

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
        "onnx": _load_onnx,
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


def _load_onnx(file: ModelFile, device: torch.device, input_shape: Any) -> Teacher:
    # onnx takes seconds to import, and only ONNX teachers need it.
    from core.distill.onnx_teacher import OnnxTeacher

    return OnnxTeacher(file.path, device)


def _load_hf(file: ModelFile, device: torch.device, input_shape: Any) -> Teacher:
    # hf.models builds its teacher on ModuleTeacher (this module): imported here, not above.
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
