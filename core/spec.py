"""The distillation job spec (API.md, "Jobs"): one definition for the API and the engine.

A spec is parsed with :func:`parse_spec` (unknown fields and impossible values raise
:class:`~core.errors.InvalidSpec` naming the field), then completed against what the service
knows about the teacher and the dataset with :func:`complete_spec`, which infers ``task``,
chooses the distillation method, checks shapes and fills in every default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WrapSerializer,
    WrapValidator,
    model_validator,
)

from core.errors import InvalidSpec, ShapeMismatch

Task = Literal["classification", "regression", "causal_lm"]
Preset = Literal["mlp", "cnn", "resnet", "transformer"]
ExportFormat = Literal["torchscript", "onnx", "safetensors", "hf"]
Quantization = Literal["none", "dynamic_int8", "fp16", "static_int8"]

MAX_EPOCHS = 10_000
MAX_BATCH = 65_536


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- values the service chooses ("auto") -------------------------------------------------------
#
# A field that may be chosen from the data reads, in a spec: absent or "auto" (choose it), a
# number (the user's, never changed), or {"auto": number} (chosen by the service and written back
# into the completed spec; sent again, it is used as given). In Python a chosen value is an
# AutoInt / AutoFloat: a plain number to every calculation, {"auto": …} when serialised.


class AutoInt(int):
    """An int the service chose; serialised as ``{"auto": value}``."""


class AutoFloat(float):
    """A float the service chose; serialised as ``{"auto": value}``."""


AUTO = "auto"


def undecided(value: Any) -> bool:
    """Whether a field still waits for the service's choice (``"auto"``)."""
    return isinstance(value, str) and value == AUTO


def _auto_validator(kind: type) -> WrapValidator:
    def validate(value: Any, handler: Any) -> Any:
        if isinstance(value, AutoInt | AutoFloat):
            return value
        if isinstance(value, dict) and set(value) == {AUTO}:
            if value[AUTO] is None:
                return AUTO
            return (AutoInt if kind is int else AutoFloat)(handler(value[AUTO]))
        return handler(value)

    return WrapValidator(validate)


def _auto_serializer(value: Any, handler: Any) -> Any:
    if isinstance(value, AutoInt):
        return {AUTO: int(value)}
    if isinstance(value, AutoFloat):
        return {AUTO: float(value)}
    return handler(value)


def Auto(kind: type, **constraints: Any) -> Any:  # noqa: N802 - reads as a type in annotations
    """A field type: a ``kind`` number within ``constraints``, ``"auto"`` or ``{"auto": n}``."""
    return Annotated[
        Annotated[kind, Field(**constraints)] | Literal["auto"],
        _auto_validator(kind),
        WrapSerializer(_auto_serializer),
    ]


class ModelRef(StrictModel):
    """An uploaded model (``model_id``) or, for local runs, a file (``path``)."""

    model_id: str | None = None
    path: str | None = None
    format: str | None = None  # local runs: detected from the file when absent
    arch: str | None = None  # safetensors: the built-in architecture (local runs)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelRef:
        if (self.model_id is None) == (self.path is None):
            raise ValueError("give exactly one of model_id or path")
        return self


class WeightedModelRef(ModelRef):
    weight: float = Field(default=1.0, gt=0)


class FromTeacher(StrictModel):
    """An ``hf`` teacher's own architecture made smaller (API.md, "Students of an hf teacher").

    Unset sizes keep the teacher's (``heads`` and ``intermediate_size`` follow a smaller
    ``hidden_size``); weights come from the teacher (every k-th layer; the most important
    channels and heads) unless ``init`` is ``random``.
    """

    layers: int | None = Field(default=None, ge=1, le=256)
    hidden_size: int | None = Field(default=None, ge=8, le=16384)
    intermediate_size: int | None = Field(default=None, ge=8, le=65536)
    heads: int | None = Field(default=None, ge=1, le=256)
    init: Literal["teacher", "random"] = "teacher"


class StudentSpec(StrictModel):
    """A preset with size knobs, an uploaded trainable model, a shrunk copy of the teacher, or
    (``hf`` teachers) the teacher made smaller or a fresh model of its family."""

    preset: Preset | None = None
    width: Auto(int, ge=1, le=8192) | None = None  # type: ignore[valid-type]
    depth: Auto(int, ge=0, le=64) | None = None  # type: ignore[valid-type]  # mlp: 0 is linear
    heads: int | None = Field(default=None, ge=1, le=64)  # transformer only
    dropout: float = Field(default=0.0, ge=0, lt=1)
    model_id: str | None = None
    path: str | None = None
    format: str | None = None
    arch: str | None = None
    shrink: float | None = Field(default=None, gt=0, lt=1)
    from_teacher: FromTeacher | None = None
    hf_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StudentSpec:
        kinds = [
            k
            for k, v in (
                ("preset", self.preset),
                ("model_id", self.model_id),
                ("path", self.path),
                ("shrink", self.shrink),
                ("from_teacher", self.from_teacher),
                ("hf_config", self.hf_config),
            )
            if v is not None
        ]
        if not kinds:
            self.preset = "mlp"
        elif len(kinds) > 1:
            raise ValueError(
                "give one of preset, model_id, path, shrink, from_teacher or hf_config, "
                f"not {kinds}"
            )
        if self.preset is None and any(v is not None for v in (self.width, self.depth, self.heads)):
            raise ValueError("width, depth and heads size a preset; add a preset")
        if self.depth == 0 and self.preset != "mlp":
            raise ValueError("depth: 0 (no hidden layer) is for preset mlp only")
        return self

    def filled(self) -> StudentSpec:
        """The same student with the preset's default sizes written in."""
        if self.preset is None:
            return self
        defaults = PRESET_DEFAULTS[self.preset]
        data = self.model_dump()
        for key, value in defaults.items():
            if data.get(key) is None:
                data[key] = value
        return StudentSpec(**data)


PRESET_DEFAULTS: dict[str, dict[str, int]] = {
    "mlp": {"width": 128, "depth": 2},
    "cnn": {"width": 32, "depth": 2},
    "resnet": {"width": 16, "depth": 2},
    "transformer": {"width": 64, "depth": 2, "heads": 4},
}


class HintPair(StrictModel):
    """A teacher layer matched to a student layer (module paths; ONNX: tensor names)."""

    teacher: str = Field(min_length=1)
    student: str = Field(min_length=1)


class MethodBase(StrictModel):
    """A distillation method's settings. Its class flags say what the method needs, so that
    checks read them instead of lists of method names."""

    needs_teacher: ClassVar[bool] = True  # False: the labels-only baseline
    reads_features: ClassVar[bool] = False  # reads the teacher's intermediate layers
    causal_lm: ClassVar[bool] = False  # available for causal language models
    causal_only: ClassVar[bool] = False  # a per-token loss of causal language models alone
    hf_only: ClassVar[bool] = False  # maps the layers of a Hugging Face teacher and student
    needs_prompts: ClassVar[bool] = False  # completes the dataset's prompts


class _OutputKD(MethodBase):
    # "auto": chosen by training.tune (4.0 and 0.9 without it); a number is never tuned.
    temperature: Auto(float, gt=0, le=100) = 4.0  # type: ignore[valid-type]
    alpha: Auto(float, ge=0, le=1) = Field(  # type: ignore[valid-type]
        default=0.9, description="weight of distillation vs hard-label CE"
    )


class KDMethod(_OutputKD):
    """Hinton et al. 2015."""

    causal_lm = True
    method: Literal["kd"] = "kd"


class MSEMethod(MethodBase):
    """Match the teacher's outputs (regression, embeddings, or logits)."""

    method: Literal["mse"] = "mse"
    alpha: float = Field(default=1.0, ge=0, le=1, description="weight of MSE vs hard-label loss")
    # embedders: add cosine_weight · (1 − cos(s, t)) (sentence-embedding distillation)
    cosine_weight: float = Field(default=0.0, ge=0)


class DKDMethod(MethodBase):
    """Decoupled KD, Zhao et al. 2022."""

    method: Literal["dkd"] = "dkd"
    temperature: float = Field(default=4.0, gt=0, le=100)
    tckd_weight: float = Field(default=1.0, ge=0)
    nckd_weight: float = Field(default=8.0, ge=0)
    ce_weight: float = Field(default=1.0, ge=0)
    warmup_epochs: int = Field(default=5, ge=0)


class FitNetMethod(_OutputKD):
    """FitNets hint learning, Romero et al. 2015 (plus output KD)."""

    reads_features = True
    method: Literal["fitnet"] = "fitnet"
    hints: list[HintPair] = Field(default_factory=list)  # empty: the penultimate features
    hint_weight: float = Field(default=1.0, ge=0)


class AttentionMethod(_OutputKD):
    """Attention transfer, Zagoruyko & Komodakis 2017 (plus output KD)."""

    reads_features = True
    method: Literal["attention"] = "attention"
    hints: list[HintPair] = Field(default_factory=list)
    beta: float = Field(default=1000.0, ge=0)
    p: float = Field(default=2.0, gt=0)
    # hf models: TinyBERT/MiniLM attention KL; student layer i (1-based) → teacher layer
    layer_map: list[int] | None = Field(default=None, max_length=256)
    attention_weight: float = Field(default=1.0, ge=0)


class ReverseKLMethod(_OutputKD):
    """Reverse KL(student ‖ teacher) per token, mode-seeking (Gu et al. 2024, MiniLLM)."""

    causal_lm = causal_only = True
    method: Literal["reverse_kl"] = "reverse_kl"


class JSDMethod(_OutputKD):
    """Generalised Jensen–Shannon divergence per token (Agarwal et al. 2024, GKD): β = 0 is
    forward KL, β = 1 reverse KL."""

    causal_lm = causal_only = True
    method: Literal["jsd"] = "jsd"
    beta: float = Field(default=0.5, ge=0, le=1)


class GenerateSpec(StrictModel):
    """How a model writes completions (``seqkd``: the teacher; ``gkd``: the student)."""

    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=10)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    samples: int = Field(default=1, ge=1, le=16)  # seqkd: completions per prompt


class SeqKDMethod(MethodBase):
    """Sequence-level KD (Kim & Rush 2016): the student learns the teacher's completions."""

    causal_lm = causal_only = needs_prompts = True
    method: Literal["seqkd"] = "seqkd"
    generate: GenerateSpec = Field(default_factory=GenerateSpec)


class GKDMethod(MethodBase):
    """On-policy generalised KD (Agarwal et al. 2024): with probability λ a batch is the
    student's own completions of the prompts, scored per token by the teacher with JSD_β."""

    causal_lm = causal_only = needs_prompts = True
    method: Literal["gkd"] = "gkd"
    lmbda: float = Field(default=0.5, ge=0, le=1)
    beta: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0, le=100)
    alpha: float = Field(default=1.0, ge=0, le=1)
    generate: GenerateSpec = Field(default_factory=GenerateSpec)


class HiddenMethod(_OutputKD):
    """Hidden-state distillation, TinyBERT (Jiao et al. 2020) / FitNets (plus output KD)."""

    reads_features = hf_only = causal_lm = True
    method: Literal["hidden"] = "hidden"
    # student layer i (0 = embeddings) → teacher layer; default: uniform (TinyBERT)
    layer_map: list[int] | None = Field(default=None, max_length=257)
    hidden_weight: float = Field(default=1.0, ge=0)


class RKDMethod(_OutputKD):
    """Relational KD, Park et al. 2019 (plus output KD)."""

    reads_features = True
    method: Literal["rkd"] = "rkd"
    distance_weight: float = Field(default=25.0, ge=0)
    angle_weight: float = Field(default=50.0, ge=0)


class BaselineSpec(MethodBase):
    """Labels only, no teacher: what every job with labels also trains, to compare."""

    needs_teacher = False
    method: Literal["baseline"] = "baseline"


# Every method's settings, by name. A new method adds its class here (and its module to
# core/distill/methods/__init__.py).
METHOD_SPECS: dict[str, type[MethodBase]] = {
    cls.model_fields["method"].default: cls
    for cls in (
        *(KDMethod, MSEMethod, DKDMethod, FitNetMethod, AttentionMethod, RKDMethod),
        *(HiddenMethod, ReverseKLMethod, JSDMethod, SeqKDMethod, GKDMethod, BaselineSpec),
    )
}
MethodSpec = Annotated[Union[tuple(METHOD_SPECS.values())], Field(discriminator="method")]  # noqa: UP007


def method_names(**flags: bool) -> list[str]:
    """The names of the methods whose class flags have the given values, in order."""
    return [
        name
        for name, cls in METHOD_SPECS.items()
        if all(getattr(cls, flag) == value for flag, value in flags.items())
    ]


def _taught(method: MethodBase) -> MethodBase:
    if not method.needs_teacher:
        raise ValueError(
            f"method: '{method.method}' is the labels-only run that a job with labels makes "
            "beside the distilled student (training.baseline); choose a distillation method"
        )
    return method


# A job's methods: every one that learns from a teacher.
DistillationSpec = Annotated[MethodSpec, AfterValidator(_taught)]
METHODS = tuple(method_names(needs_teacher=True))


class StageSpec(StrictModel):
    student: StudentSpec
    distillation: DistillationSpec | None = None  # default: the job's


class TuneSpec(StrictModel):
    """A search over lr, temperature, alpha and weight decay (Optuna), poor trials pruned."""

    trials: int = Field(default=20, ge=1, le=500)
    budget_minutes: float | None = Field(default=None, gt=0, le=7 * 24 * 60)


class TrainingSpec(StrictModel):
    # "auto" (the default): chosen from the data by the engine (docs/SPEC.md, "The recipe").
    epochs: Auto(int, ge=1, le=MAX_EPOCHS) = AUTO  # type: ignore[valid-type]
    batch_size: Auto(int, ge=1, le=MAX_BATCH) = AUTO  # type: ignore[valid-type]
    lr: Auto(float, gt=0, le=10) = AUTO  # type: ignore[valid-type]
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: Auto(float, ge=0, le=1) = 0.01  # type: ignore[valid-type]
    momentum: float = Field(default=0.9, ge=0, lt=1)  # sgd only
    warmup_epochs: Auto(float, ge=0, le=MAX_EPOCHS) = AUTO  # type: ignore[valid-type]
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    early_stopping_patience: Auto(int, ge=1) | None = AUTO  # type: ignore[valid-type]
    max_minutes: float = Field(default=60.0, gt=0, le=7 * 24 * 60)
    cache_teacher_outputs: bool = True
    max_length: int = Field(default=128, ge=2, le=8192)  # hf teachers: tokens per text
    # causal LMs: the teacher's top-k logits per token cached once per pair (0: full logits live)
    logit_cache_k: int = Field(default=64, ge=0, le=1024)
    baseline: bool = True  # also train the student on labels alone, when labels exist
    # hf students: recompute each layer's activations in the backward pass (less memory)
    gradient_checkpointing: bool = False
    # causal LMs: where the teacher runs (None: the job's device) and its weights' dtype
    teacher_device: str | None = Field(default=None, pattern=r"^(cpu|cuda|cuda:\d+)$")
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    tune: TuneSpec | None = None


class PruneSpec(StrictModel):
    amount: float = Field(default=0.5, gt=0, lt=1)
    structured: bool = False


class CompressionSpec(StrictModel):
    prune: PruneSpec | None = None
    quantize: Quantization = "none"


class SpecRef(NamedTuple):
    """A model the spec references, with the dotted field that names it."""

    field: str
    ref: ModelRef | StudentSpec

    @property
    def key(self) -> str | None:
        """The upload's id, or the local file's path; None for a preset or derived student."""
        return self.ref.model_id or self.ref.path


class JobSpec(StrictModel):
    name: str | None = Field(default=None, max_length=200)
    teacher: ModelRef | None = None
    teachers: list[WeightedModelRef] | None = Field(default=None, min_length=1, max_length=16)
    dataset_id: str | None = None
    dataset_path: str | None = None
    task: Task | None = None
    student: StudentSpec | None = None
    distillation: DistillationSpec | None = None
    stages: list[StageSpec] | None = Field(default=None, min_length=1, max_length=8)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    export: list[ExportFormat] = Field(
        default_factory=lambda: ["torchscript", "onnx", "safetensors"]
    )

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if (self.teacher is None) == (self.teachers is None):
            raise ValueError("teacher: give exactly one of teacher or teachers")
        if (self.dataset_id is None) == (self.dataset_path is None):
            raise ValueError("dataset_id: give exactly one of dataset_id or dataset_path")
        if self.stages is not None and self.student is not None:
            raise ValueError(
                "stages: give either student or stages (the last stage is the result), not both"
            )
        if len(set(self.export)) != len(self.export):
            raise ValueError("export: lists a format twice")
        return self

    def teacher_refs(self) -> list[WeightedModelRef]:
        """The teachers as a weighted list (one teacher has weight 1)."""
        if self.teachers is not None:
            return list(self.teachers)
        assert self.teacher is not None
        return [WeightedModelRef(**self.teacher.model_dump())]

    def teacher_fields(self) -> list[SpecRef]:
        """Each teacher with its dotted field (``teacher``, or ``teachers.<i>``)."""
        if self.teachers is not None:
            return [SpecRef(f"teachers.{i}", t) for i, t in enumerate(self.teachers)]
        assert self.teacher is not None
        return [SpecRef("teacher", self.teacher)]

    def student_field(self, index: int = 0) -> str:
        """The dotted field of the chain's ``index``-th student."""
        return f"stages.{index}.student" if self.stages is not None else "student"

    def student_fields(self) -> list[SpecRef]:
        """The students as given, each with its dotted field (none for a default student)."""
        if self.stages is not None:
            return [SpecRef(self.student_field(i), s.student) for i, s in enumerate(self.stages)]
        return [SpecRef("student", self.student)] if self.student is not None else []

    def model_refs(self) -> list[SpecRef]:
        """Every model the spec names by ``model_id`` or ``path``: the teachers, then the
        students (assistants of a chain included), in order, each with its dotted field."""
        students = [r for r in self.student_fields() if r.key is not None]
        return [*self.teacher_fields(), *students]

    def chain(self) -> list[StageSpec]:
        """The stages to run in order; a plain spec is a one-stage chain."""
        if self.stages is not None:
            return [
                StageSpec(
                    student=s.student.filled(), distillation=s.distillation or self.distillation
                )
                for s in self.stages
            ]
        return [
            StageSpec(
                student=(self.student or StudentSpec()).filled(), distillation=self.distillation
            )
        ]


def parse_spec(data: Any) -> JobSpec:
    """Validate a spec; raise InvalidSpec naming the first wrong field (dotted path)."""
    if not isinstance(data, dict):
        raise InvalidSpec("the job spec must be a JSON object", field="")
    check_values(data)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid_spec(exc) from None


def check_values(data: Any) -> None:
    """Refuse what no field may hold: NUL characters, text that is not Unicode (lone
    surrogates) and numbers that are not finite (``NaN``, ``Infinity``, ``1e309``).

    Checked on the raw JSON before the model, so that nothing a database or the engine would
    choke on later (PostgreSQL's ``json`` refuses them) is ever stored. Iterative: a deeply
    nested body raises InvalidSpec, not RecursionError.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                field = f"{path}.{key}" if path else str(key)
                _check_text(str(key), field)
                stack.append((field, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidSpec(
                f"'{path}': {value} is not a finite number (NaN, Infinity and numbers beyond "
                "1.8e308 are refused); give a finite value",
                field=path,
            )


def _check_text(text: str, field: str) -> None:
    if "\x00" in text:
        raise InvalidSpec(
            f"'{field}': text may not contain NUL characters (\\u0000); remove them", field=field
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSpec(
            f"'{field}': text is not valid Unicode (a lone surrogate such as \\ud800); send "
            "UTF-8 text",
            field=field,
        ) from None


def _invalid_spec(exc: ValidationError) -> InvalidSpec:
    problems = [_problem(e) for e in exc.errors(include_url=False, include_context=False)]
    field, msg = problems[0]["field"], problems[0]["message"]
    if exc.errors()[0]["type"] == "extra_forbidden":
        message = f"unknown field '{field}'; remove it (see the job spec in the API docs)"
    else:
        message = f"'{field}': {msg}" if field else msg
    return InvalidSpec(message, field=field, details={"errors": problems})


def _problem(error: Any) -> dict[str, str]:
    """A pydantic error as {"field": dotted path, "message": text}."""
    field = ".".join(str(p) for p in error["loc"] if not _is_union_tag(p))
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "union_tag_invalid" and isinstance(error.get("input"), dict):
        name = error["input"].get("method")
        return {
            "field": f"{field}.method" if field else "method",
            "message": f"unknown method '{name}'; use one of: {', '.join(METHODS)}",
        }
    # Model-level validators name their field as "field: message".
    head, sep, rest = msg.partition(": ")
    if sep and " " not in head:
        field = f"{field}.{head}" if field else head
        msg = rest
    return {"field": field, "message": msg}


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the discriminator value ("kd", "mse", …) and the union member of an "auto"
    # field ("constrained-int", "literal['auto']") into error locations.
    return isinstance(part, str) and (
        part in METHOD_SPECS
        or part.startswith(("constrained-", "literal["))
        or part in ("int", "float")
    )


# --- completion against the teacher and the dataset --------------------------------------------


class TensorInfo(StrictModel):
    """One input or output: shape with ``None`` for the batch dimension, and dtype."""

    shape: list[int | None] | None  # None: rank unknown (a TorchScript file without a probe)
    dtype: str


class ModelInfo(StrictModel):
    """What the service recorded about a model when it was uploaded."""

    format: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    trainable: bool = False
    arch: str | None = None  # a built-in architecture (safetensors), so `shrink` works
    parameters: int | None = None  # sizes the default student
    hf: dict[str, Any] | None = None  # hf uploads: architecture, task, labels, sizes
    # Whether the teacher names default features for fitnet/attention/rkd (the input of its
    # last linear layer); None: not recorded (uploads from before this was recorded).
    has_default_features: bool | None = None


class DatasetInfo(StrictModel):
    n_samples: int
    x_shape: list[int | None]
    x_dtype: str
    has_labels: bool
    n_classes: int | None = None
    y_shape: list[int | None] | None = None  # (None,) for labels, (None, k) for targets
    n_val: int | None = None  # samples in a given validation split
    text: bool = False  # a .jsonl of texts (an hf teacher tokenises them itself)
    class_names: list[str] | None = None  # label names, when the labels were given as names
    prompts: bool = False  # a .jsonl with {"prompt"} lines (causal LMs: seqkd, gkd)


def complete_spec(spec: JobSpec, teachers: list[ModelInfo], dataset: DatasetInfo) -> JobSpec:
    """Infer the task, pick the method, check shapes and sizes; return the filled-in spec."""
    if not teachers:
        raise InvalidSpec("the spec names no teacher", field="teacher")
    first = teachers[0]
    _check_hf(spec, teachers, dataset)
    for (field, _), info in zip(spec.teacher_fields(), teachers, strict=False):
        if info.hf is None:
            _check_input(info, dataset, field)
        if (info.outputs[0].shape or [])[1:] != (first.outputs[0].shape or [])[1:]:
            raise ShapeMismatch(
                f"teachers output different shapes ({first.outputs[0].shape} vs "
                f"{info.outputs[0].shape}); an ensemble needs the same output shape",
                field=field,
            )
    out_shape = first.outputs[0].shape
    # Unknown output shape (a TorchScript file without a probe): checked by the worker instead.
    out_dim = None if out_shape is None else (out_shape[-1] if len(out_shape) > 1 else 1)
    task = spec.task or _infer_task(first, dataset)
    too_many_classes = (
        task == "classification"
        and dataset.has_labels
        and dataset.n_classes is not None
        and out_dim is not None
        and dataset.n_classes > out_dim
    )
    if too_many_classes:
        raise ShapeMismatch(
            f"the dataset has {dataset.n_classes} classes but the teacher outputs "
            f"{out_dim} scores; the labels must be 0..{out_dim - 1}",
            field="dataset_id" if spec.dataset_id else "dataset_path",
        )
    n_train = (
        dataset.n_samples
        if dataset.n_val
        else int(dataset.n_samples * (1 - spec.training.val_fraction))
    )
    training = _complete_training(spec.training, max(n_train, 1))
    if task != "causal_lm" and training.batch_size > max(n_train, 1):
        raise InvalidSpec(
            f"batch_size {training.batch_size} is larger than the {n_train} training "
            "samples; use a smaller batch_size",
            field="training.batch_size",
        )
    default_method: Any = KDMethod() if task == "classification" else MSEMethod()
    if task == "causal_lm":
        default_method = KDMethod(temperature=1.0, alpha=0.5)
    distillation = _tunable(
        spec.distillation or default_method, spec.training.tune, spec.distillation is None
    )
    if task == "regression" and distillation.method in ("kd", "dkd"):
        raise InvalidSpec(
            f"method '{distillation.method}' needs class logits; use 'mse' for regression",
            field="distillation.method",
        )
    _check_feature_method(spec, teachers)
    _check_student_inputs(spec, dataset)
    data = spec.model_dump()
    data["task"] = task
    data["distillation"] = distillation.model_dump()
    data["training"] = training.model_dump()
    if first.hf is not None and "export" not in spec.model_fields_set:
        data["export"] = list(HF_EXPORTS)
    if spec.stages is None:
        if first.hf is not None:
            default = StudentSpec(from_teacher=default_hf_student(first.hf, task))
            student = spec.student or default
        else:
            student = spec.student or _default_student(teachers, dataset, out_dim)
        data["student"] = student.filled().model_dump()
    else:
        if spec.training.tune is not None:
            raise InvalidSpec(
                "training.tune searches the settings of one student; remove stages or tune",
                field="training.tune",
            )
        data["stages"] = [
            {
                "student": s.student.filled().model_dump(),
                "distillation": (
                    _tunable(s.distillation, None, False).model_dump() if s.distillation else None
                ),
            }
            for s in spec.stages
        ]
    for i, stage in enumerate(spec.chain()):
        if stage.student.shrink is not None and first.arch is None:
            raise InvalidSpec(
                "shrink needs a teacher whose architecture is built in (a safetensors upload "
                "with arch); use a preset student instead",
                field=f"{spec.student_field(i)}.shrink",
            )
    return JobSpec.model_validate(data)


TUNED_DEFAULTS = {"temperature": 4.0, "alpha": 0.9, "weight_decay": 0.01}
FALLBACK_LR = 1e-3  # a trainer called without the pipeline's search


def concrete_training(training: TrainingSpec, n_train: int) -> TrainingSpec:
    """Training settings as plain numbers, no "auto" left (what the trainer runs with, and
    pickles into checkpoints): chosen from ``n_train`` as :func:`complete_spec` does, the lr
    (which the pipeline finds on the data) and weight decay at fixed defaults."""
    training = _complete_training(training, max(n_train, 1))
    update: dict[str, Any] = {}
    if undecided(training.lr):
        update["lr"] = FALLBACK_LR
    if undecided(training.weight_decay):
        update["weight_decay"] = TUNED_DEFAULTS["weight_decay"]
    for name in type(training).model_fields:
        value = getattr(training, name)
        if isinstance(value, AutoInt | AutoFloat):
            update[name] = int(value) if isinstance(value, AutoInt) else float(value)
    return training.model_copy(update=update) if update else training


def _tunable(method: Any, tune: TuneSpec | None, default: bool) -> Any:
    """With ``tune``, a method's temperature and alpha left at their defaults become "auto"
    (searched); without it, an "auto" one is the default."""
    update: dict[str, Any] = {}
    for name in ("temperature", "alpha"):
        if name not in type(method).model_fields:
            continue
        value = getattr(method, name)
        if tune is not None and (default or name not in method.model_fields_set):
            update[name] = AUTO if not isinstance(value, AutoFloat) else value
        elif undecided(value) and tune is None:
            update[name] = AutoFloat(TUNED_DEFAULTS[name])
    return method.model_copy(update=update) if update else method


def _complete_training(training: TrainingSpec, n_train: int) -> TrainingSpec:
    """The training settings with every "auto" one chosen from the number of training samples
    (core/recipe.py); the learning rate is left to the engine, which finds it on the data (or
    ``tune`` searches it, with the weight decay)."""
    from core import recipe

    update: dict[str, Any] = {}
    if training.tune is not None and "weight_decay" not in training.model_fields_set:
        update["weight_decay"] = AUTO
    elif undecided(training.weight_decay) and training.tune is None:
        update["weight_decay"] = AutoFloat(TUNED_DEFAULTS["weight_decay"])
    batch = training.batch_size
    if undecided(batch):
        batch = update["batch_size"] = AutoInt(recipe.batch_size(n_train))
    n_epochs = training.epochs
    if undecided(n_epochs):
        n_epochs = update["epochs"] = AutoInt(recipe.epochs(n_train, min(batch, n_train)))
    if undecided(training.warmup_epochs):
        warmup = recipe.warmup_epochs(n_train, min(batch, n_train), n_epochs)
        update["warmup_epochs"] = AutoFloat(warmup)
    if undecided(training.early_stopping_patience):
        update["early_stopping_patience"] = AutoInt(recipe.patience(n_epochs))
    return training.model_copy(update=update)


def _default_student(
    teachers: list[ModelInfo], dataset: DatasetInfo, out_dim: int | None
) -> StudentSpec:
    """No student given: an mlp sized from the teacher's parameters (core/recipe.py), when the
    inputs are fixed-size floats and the teacher's size is known; else the preset's defaults."""
    from core import recipe

    sizes = [t.parameters for t in teachers]
    shape = dataset.x_shape[1:]
    floats = dataset.x_dtype.startswith(("float", "bfloat"))
    if not floats or any(d is None for d in shape) or out_dim is None or not all(sizes):
        return StudentSpec()
    width, depth = recipe.mlp_size(math.prod(shape), out_dim, sum(sizes))  # type: ignore[arg-type]
    return StudentSpec(preset="mlp", width=AutoInt(width), depth=AutoInt(depth))


HF_EXPORTS = ("hf", "onnx")


def default_hf_student(hf: dict[str, Any], task: str) -> FromTeacher:
    """An ``hf`` teacher's default student: a third of its layers (half of a shallow one), as
    DistilBERT and TinyBERT-4 do, and half its width when that alone is not clearly smaller
    (an embedder keeps its width, so that its embeddings compare with the teacher's)."""
    n = int(hf.get("num_layers") or 1)
    layers = max(1, n // 3 if n >= 6 else n // 2)
    h = int(hf.get("hidden_size") or 0)
    inter = int(hf.get("intermediate_size") or 4 * h)
    heads = int(hf.get("num_heads") or 1)
    vocab = int(hf.get("vocab_size") or 0) + int(hf.get("max_positions") or 0)

    def size(layers: int, h: int, inter: int) -> int:
        return vocab * h + layers * (4 * h * h + 2 * h * inter)

    if task == "regression" or not h or size(layers, h, inter) <= 0.5 * size(n, h, inter):
        return FromTeacher(layers=layers)
    head_dim = max(1, h // heads)
    new_heads = max(1, heads // 2)
    return FromTeacher(
        layers=layers,
        hidden_size=new_heads * head_dim,
        heads=new_heads,
        intermediate_size=max(8, inter * new_heads * head_dim // h),
    )


def _check_lm_options(spec: JobSpec, teacher: ModelInfo) -> None:
    """The training and compression fields that only Hugging Face or causal-LM jobs use."""
    training, compression = spec.training, spec.compression
    hf = teacher.hf or {}
    if training.gradient_checkpointing and teacher.hf is None:
        raise InvalidSpec(
            "gradient_checkpointing applies to Hugging Face students; this teacher is a "
            f"{teacher.format} file: remove it",
            field="training.gradient_checkpointing",
        )
    if hf.get("task") != "causal_lm":
        for key, unset in (("teacher_device", None), ("teacher_dtype", "fp32")):
            if getattr(training, key) != unset:
                raise InvalidSpec(
                    f"{key} applies to causal language model teachers, which run on every "
                    "training batch; other teachers' outputs are computed once: remove it",
                    field=f"training.{key}",
                )
        return
    if compression.prune is not None:
        raise InvalidSpec(
            "pruning is not available for a causal language model student; make it smaller "
            "with from_teacher (layers, hidden_size) or quantize it ('dynamic_int8')",
            field="compression.prune",
        )
    if compression.quantize not in ("none", "dynamic_int8"):
        raise InvalidSpec(
            f"quantization '{compression.quantize}' is not available for a causal language "
            "model student; use 'dynamic_int8'",
            field="compression.quantize",
        )


def _check_hf(spec: JobSpec, teachers: list[ModelInfo], dataset: DatasetInfo) -> None:
    """What an ``hf`` teacher needs of the spec and the dataset, and what only it allows."""
    first = teachers[0]
    students = spec.student_fields()
    exports_hf = "hf" in spec.export
    dataset_field = "dataset_id" if spec.dataset_id else "dataset_path"
    _check_lm_options(spec, first)
    if first.hf is None:
        for where, student in students:
            for key in ("from_teacher", "hf_config"):
                if getattr(student, key) is not None:
                    raise InvalidSpec(
                        f"'{key}' makes a student from a Hugging Face teacher; this teacher is a "
                        f"{first.format} file: use a preset, shrink or an uploaded student",
                        field=f"{where}.{key}",
                    )
        method = spec.distillation
        if method is not None and method.causal_only:
            raise InvalidSpec(
                f"method '{method.method}' is a per-token loss of causal language models; this "
                "teacher is not one: use 'kd'",
                field="distillation.method",
            )
        if method is not None and method.hf_only:
            raise InvalidSpec(
                f"method '{method.method}' maps a Hugging Face teacher's layers; for other "
                "teachers use 'fitnet'",
                field="distillation.method",
            )
        if exports_hf:
            raise InvalidSpec(
                "export 'hf' (save_pretrained) needs a Hugging Face teacher and student",
                field="export",
            )
        return
    hf = first.hf
    _check_layer_map(spec, int(hf.get("num_layers") or 0))
    if hf.get("task") == "causal_lm":
        method = spec.distillation or KDMethod()
        if not method.causal_lm:
            raise InvalidSpec(
                f"method '{method.method}' is not available for a causal language model; use "
                f"one of {', '.join(method_names(causal_lm=True))}",
                field="distillation.method",
            )
        if method.needs_prompts and not dataset.prompts:
            raise InvalidSpec(
                f"method '{method.method}' completes prompts, and the dataset has none; upload a "
                '.jsonl with {"prompt": ...} lines (a completion is optional)',
                field=dataset_field,
            )
    if len(teachers) > 1:
        raise InvalidSpec(
            "an ensemble of Hugging Face teachers is not supported; give one teacher",
            field="teachers",
        )
    if spec.stages is not None and len(spec.stages) > 1:
        raise InvalidSpec(
            "a Hugging Face teacher is distilled in one stage; give one student",
            field="stages",
        )
    if not dataset.text:
        raise ShapeMismatch(
            "a Hugging Face teacher reads text with its own tokenizer: upload a .jsonl dataset "
            'of {"text": ..., "label": ...} lines',
            field=dataset_field,
        )
    names = set((hf.get("id2label") or {}).values())
    if dataset.class_names and hf.get("task") == "sequence_classification":
        unknown = sorted(set(dataset.class_names) - names)
        if unknown:
            raise InvalidSpec(
                f"the dataset's labels {unknown[:10]} are not label names of the teacher "
                f"(its id2label has {sorted(names)[:20]}); use the teacher's label names or "
                "their integer ids",
                field=dataset_field,
            )
    bad_export = [f for f in spec.export if f in ("torchscript", "safetensors")]
    if bad_export and "export" in spec.model_fields_set:
        raise InvalidSpec(
            f"export '{bad_export[0]}' is not available for a Hugging Face student; use 'hf' "
            "(save_pretrained zip) and 'onnx'",
            field="export",
        )
    for where, student in students:
        if student.preset is not None or student.shrink is not None:
            key = "preset" if student.preset is not None else "shrink"
            raise InvalidSpec(
                f"a Hugging Face teacher's student is made from it: give "
                '{"from_teacher": {"layers": ..., "hidden_size": ...}}, {"hf_config": {...}} or '
                "the model_id of an uploaded hf student, not a "
                f"{key}",
                field=f"{where}.{key}",
            )
        small = student.from_teacher
        if (
            small is not None
            and hf.get("task") == "feature_extraction"
            and small.hidden_size not in (None, hf.get("hidden_size"))
        ):
            raise InvalidSpec(
                "an embedding student keeps the teacher's hidden_size "
                f"({hf.get('hidden_size')}) so that its embeddings compare with the teacher's; "
                "make it smaller with fewer layers",
                field=f"{where}.from_teacher.hidden_size",
            )


def _check_layer_map(spec: JobSpec, n_teacher: int) -> None:
    """A method's ``layer_map`` names layers the hf teacher has (0: its embeddings)."""
    layers = getattr(spec.distillation, "layer_map", None)
    if not layers or not n_teacher:
        return
    wrong = [g for g in layers if not 0 <= g <= n_teacher]
    if wrong:
        raise InvalidSpec(
            f"layer_map lists teacher layers {wrong[:5]}, and the teacher has layers "
            f"0..{n_teacher} (0: its embeddings); give one teacher layer per student layer, "
            "each in that range",
            field="distillation.layer_map",
        )


def _check_feature_method(spec: JobSpec, teachers: list[ModelInfo]) -> None:
    """A feature method in the first stage (the one the uploaded teacher teaches) needs one
    teacher whose layers can be read: refused here rather than when the job runs."""
    own = spec.stages is not None and spec.stages[0].distillation is not None
    method = spec.stages[0].distillation if own else spec.distillation  # as chain() falls back
    if method is None or not method.reads_features:
        return
    field = "stages.0.distillation.method" if own else "distillation.method"
    if len(teachers) > 1:
        raise InvalidSpec(
            f"method '{method.method}' reads a teacher's layers and needs a single teacher; use "
            "kd, dkd or mse with an ensemble",
            field=field,
        )
    if teachers[0].format == "torchscript":
        raise InvalidSpec(
            f"method '{method.method}' reads the teacher's intermediate layers, which a "
            "TorchScript teacher cannot give; upload the teacher as an exported_program "
            "(torch.export.save), or use an output method (kd, dkd, mse)",
            field=field,
        )
    hints = getattr(method, "hints", None)
    if not hints and teachers[0].format == "onnx" and teachers[0].has_default_features is False:
        raise InvalidSpec(
            f"method '{method.method}' reads the teacher's penultimate features, and this ONNX "
            "teacher has none (no final Gemm/MatMul layer: a tree ensemble, for instance); use "
            "an output method (kd, dkd, mse), or name tensors in distillation.hints",
            field=field,
        )


def preset_input_problem(preset: str, shape: list[int | None], dtype: str) -> str | None:
    """Why a preset student cannot take one sample of ``shape``/``dtype`` (None: it can)."""
    tokens = dtype.startswith(("int", "uint"))
    data = f"{dtype} of shape {['N', *shape]}"
    if preset == "mlp" and not tokens and any(d is None for d in shape):
        return (
            f"an mlp needs a fixed input shape, got {shape}; use preset transformer for "
            "variable-length sequences"
        )
    if preset in ("cnn", "resnet") and (tokens or len(shape) not in (2, 3)):
        return (
            f"a {preset} needs image inputs (C, H, W) or (H, W) of floats, but the data is "
            f"{data}; use preset mlp (or transformer for sequences)"
        )
    if (
        preset == "transformer"
        and not (tokens and len(shape) == 1)
        and not (not tokens and len(shape) == 2)
    ):
        return (
            "a transformer needs token ids (N, L) or float sequences (N, L, d), but the data "
            f"is {data}; use preset mlp or cnn"
        )
    return None


def _check_student_inputs(spec: JobSpec, dataset: DatasetInfo) -> None:
    """Every preset student takes the dataset's x: refused here rather than when the job runs."""
    dtype = dataset.x_dtype.removeprefix("torch.")
    if not dtype.startswith(("float", "bfloat", "int", "uint")):
        return  # not a tensor yet (text, for one): the worker decides
    for i, stage in enumerate(spec.chain()):
        if stage.student.preset is None:
            continue
        problem = preset_input_problem(stage.student.preset, dataset.x_shape[1:], dtype)
        if problem:
            raise InvalidSpec(
                problem,
                field=f"{spec.student_field(i)}.preset",
            )


def _check_input(info: ModelInfo, dataset: DatasetInfo, field: str) -> None:
    if info.inputs[0].shape is None:
        return  # unknown until the worker's dry forward
    expected = info.inputs[0].shape[1:]
    got = dataset.x_shape[1:]
    if len(expected) != len(got) or any(
        e is not None and e != g for e, g in zip(expected, got, strict=False)
    ):
        raise ShapeMismatch(
            f"the teacher takes inputs of shape {['N', *expected]} but the dataset's x has "
            f"shape {['N', *got]}; upload a dataset shaped like the teacher's input",
            field=field,
        )


def _infer_task(teacher: ModelInfo, dataset: DatasetInfo) -> Task:
    if teacher.hf is not None:
        if teacher.hf.get("task") == "causal_lm":
            return "causal_lm"
        return (
            "classification"
            if teacher.hf.get("task") == "sequence_classification"
            else ("regression")
        )
    if dataset.has_labels and dataset.y_shape is not None and len(dataset.y_shape) > 1:
        return "regression"
    if dataset.has_labels:
        return "classification"
    out = teacher.outputs[0]
    shape = out.shape or []
    if len(shape) == 2 and out.dtype.startswith("float") and (shape[1] or 0) > 1:
        # Without labels a 2-D float output may be logits or an embedding: logits is likelier
        # for an uploaded classifier; users distilling embeddings say task=regression.
        return "classification"
    return "regression"
