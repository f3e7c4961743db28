"""ONNX teachers: a model run by onnxruntime, its signature read from the graph.

Features are extra graph outputs named by tensor. A classifier exported with its probabilities
(a softmax, or skl2onnx's ``predict_proba`` and ZipMap) gives log-probabilities as scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import AttributeProto
from onnx.helper import tensor_dtype_to_np_dtype

from core.distill.formats import check_onnx_tensors
from core.distill.teacher_io import DEFAULT_BATCH, chunks, unknown_layer
from core.errors import ModelInvalid
from core.spec import ModelInfo, TensorInfo


class OnnxTeacher:
    """An ONNX model run by onnxruntime; features are extra graph outputs named by tensor."""

    def __init__(
        self, path: Path, device: torch.device | str = "cpu", batch_size: int = DEFAULT_BATCH
    ) -> None:
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
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, extra: tuple[str, ...]) -> Any:
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
        for sl in chunks(len(arr), size):
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
                raise unknown_layer(name, layers, " (ONNX teachers name tensors)")
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
