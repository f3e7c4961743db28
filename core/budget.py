"""What a job will cost, estimated from its completed spec before it is queued.

The service refuses a job over its budget at submission (``422 over_budget``) instead of letting
it hold a worker for days or be killed for memory hours in. Estimates come from the spec and the
shapes recorded at upload (the dataset's ``n_samples`` and ``x_shape``, the teacher's output
size), in closed form for the preset students (``core/distill/students.py``): no model is built.
An uploaded or shrunk student is sized by its upload, which the upload limit bounds already.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from core.config import Settings
from core.errors import OverBudget
from core.spec import DatasetInfo, JobSpec, ModelInfo, StudentSpec

VOCAB_SIZE = 257  # as core.distill.students (the byte tokenizer)
MAX_TOKENS = 2048  # the transformer's position table
UNKNOWN_LENGTH = 512  # a sequence length the dataset leaves open
# fp32 weights, their gradients and AdamW's two moments.
BYTES_PER_PARAMETER = 16
# Each activation is kept for the backward pass and has a gradient of the same size.
BYTES_PER_ACTIVATION = 8


@dataclass(frozen=True)
class Estimate:
    """A job's size: its largest student, its peak memory and its optimizer steps."""

    parameters: int
    memory_mb: int
    optimizer_steps: int
    max_minutes: float


@dataclass(frozen=True)
class StudentSize:
    parameters: int
    activations: int  # floats per sample kept for the backward pass


def estimate_job(spec: JobSpec, teachers: list[ModelInfo], dataset: DatasetInfo) -> Estimate:
    """The estimate for a completed spec (``complete_spec``: defaults filled in)."""
    sample = list(dataset.x_shape[1:])
    tokens = dataset.x_dtype.startswith(("int", "uint"))
    outputs = _output_dim(teachers, dataset)
    batch = spec.training.batch_size
    n_train = dataset.n_samples
    if not dataset.n_val:  # as complete_spec: a fraction held out for validation
        n_train = int(n_train * (1 - spec.training.val_fraction))
    steps_per_epoch = math.ceil(max(n_train, 1) / batch)
    # A completed spec has its students filled in (chain() would validate them again).
    students = [r.ref for r in spec.student_fields()] or [StudentSpec()]
    sizes = [_student(s, sample, tokens, outputs) for s in students]  # type: ignore[arg-type]
    runs = len(sizes) + (1 if spec.training.baseline and dataset.has_labels else 0)
    memory = max(
        s.parameters * BYTES_PER_PARAMETER + batch * s.activations * BYTES_PER_ACTIVATION
        for s in sizes
    )
    return Estimate(
        parameters=max(s.parameters for s in sizes),
        memory_mb=math.ceil(memory / 2**20),
        optimizer_steps=runs * spec.training.epochs * steps_per_epoch,
        max_minutes=spec.training.max_minutes,
    )


def student_parameters(
    student: StudentSpec, teachers: list[ModelInfo], dataset: DatasetInfo
) -> int:
    """The closed-form parameter count of a preset student on this data (0 for an upload)."""
    sample = list(dataset.x_shape[1:])
    tokens = dataset.x_dtype.startswith(("int", "uint"))
    return _student(student.filled(), sample, tokens, _output_dim(teachers, dataset)).parameters


def check_budget(
    spec: JobSpec, teachers: list[ModelInfo], dataset: DatasetInfo, settings: Settings
) -> Estimate:
    """The job's estimate; ``OverBudget`` naming the first limit it passes."""
    estimate = estimate_job(spec, teachers, dataset)
    limits = {
        "parameters": (settings.max_student_parameters, "DISTILL_MAX_STUDENT_PARAMETERS"),
        "memory_mb": (settings.job_memory_mb, "DISTILL_JOB_MEMORY_MB"),
        "optimizer_steps": (settings.max_optimizer_steps, "DISTILL_MAX_OPTIMIZER_STEPS"),
        "max_minutes": (settings.max_job_minutes, "DISTILL_MAX_JOB_MINUTES"),
    }
    for name, (limit, setting) in limits.items():
        value = getattr(estimate, name)
        if limit is not None and value > limit:
            raise OverBudget(
                f"this job is over the service's budget: {_WHAT[name]} is about {value:,} and the "
                f"limit is {limit:,}; {_HOW[name]} (the operator sets the limit with {setting})",
                field=_FIELD[name],
                details={
                    "limit": {name: limit},
                    "estimate": asdict(estimate),
                },
            )
    return estimate


_WHAT = {
    "parameters": "the student's parameter count",
    "memory_mb": "the memory training needs (MiB)",
    "optimizer_steps": "the number of optimizer steps",
    "max_minutes": "training.max_minutes",
}
_HOW = {
    "parameters": "use a smaller width or depth",
    "memory_mb": "use a smaller batch_size, width or depth",
    "optimizer_steps": "use fewer epochs or a larger batch_size",
    "max_minutes": "give a smaller training.max_minutes",
}
_FIELD = {
    "parameters": "student",
    "memory_mb": "training.batch_size",
    "optimizer_steps": "training.epochs",
    "max_minutes": "training.max_minutes",
}


def _output_dim(teachers: list[ModelInfo], dataset: DatasetInfo) -> int:
    shape = teachers[0].outputs[0].shape if teachers else None
    if shape and len(shape) > 1 and shape[-1]:
        return int(shape[-1])
    return dataset.n_classes or 1


def _student(
    student: StudentSpec, sample: list[int | None], tokens: bool, outputs: int
) -> StudentSize:
    """Parameters and activations per sample of a preset student; an upload counts nothing."""
    if student.preset is None:
        return StudentSize(0, 0)
    width, depth = student.width or 1, student.depth or 1
    known = [d if d is not None else UNKNOWN_LENGTH for d in sample] or [1]
    if student.preset == "mlp":
        features = width if tokens else math.prod(known)
        embed = VOCAB_SIZE * width if tokens else 0
        weights = features * width + (depth - 1) * width * width + width * outputs
        params = embed + weights + depth * width + outputs  # and the biases
        return StudentSize(params, features + 3 * depth * width)
    if student.preset == "transformer":
        length = min(known[0], MAX_TOKENS)
        positions = MAX_TOKENS if sample[0] is None else sample[0]
        embed = VOCAB_SIZE * width if tokens else (known[-1] + 1) * width
        layer = 8 * width * width + 11 * width  # attention 4w², feed-forward 2·(w·2w), norms
        params = embed + positions * width + depth * layer + 2 * width + (width + 1) * outputs
        heads = student.heads or 1
        activations = depth * (12 * length * width + 2 * heads * length * length)
        return StudentSize(params, activations)
    channels = known[0] if len(known) == 3 else 1
    height, wide = (known[-2], known[-1]) if len(known) >= 2 else (known[0], 1)
    if student.preset == "cnn":
        return _cnn(channels, height * wide, width, depth, outputs)
    return _resnet(channels, height * wide, width, depth, outputs)


def _cnn(channels: int, area: int, width: int, depth: int, outputs: int) -> StudentSize:
    params = activations = 0
    c_in = channels
    for i in range(depth):
        c_out = width * min(2**i, 4)
        params += 9 * c_in * c_out + 2 * c_out
        activations += 3 * c_out * area
        area = max(area // 4, 16)
        c_in = c_out
    return StudentSize(params + c_in * outputs + outputs, activations)


def _resnet(channels: int, area: int, width: int, depth: int, outputs: int) -> StudentSize:
    params = 9 * channels * width + 2 * width
    activations = 3 * width * area
    c_in = width
    for stage in range(3):
        c_out = width * 2**stage
        if stage:
            area = max(area // 4, 1)
        for block in range(depth):
            first = c_in if block == 0 else c_out
            params += 9 * first * c_out + 9 * c_out * c_out + 4 * c_out
            if first != c_out:
                params += first * c_out + 2 * c_out
            activations += 6 * c_out * area
        c_in = c_out
    return StudentSize(params + c_in * outputs + outputs, activations)
