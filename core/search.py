"""Budget search: the request, the candidate students it proposes, and its Pareto set.

A search is a base job spec plus a ``budget`` (``max_parameters``, ``max_size_bytes``,
``max_latency_ms``) and a number of ``trials``. :func:`propose` turns it into candidate students;
each runs as an ordinary child job; :func:`summarise` reads the finished children and marks the
Pareto set (quality up, latency and size down) and the best student within the budget.

The proposal is a grid spread over size, not a sampler: every combination of the space's
presets, widths, depths and methods is sized in closed form (``core/budget.py``, no model
built), those over ``max_parameters`` or ``max_size_bytes`` (4 bytes a parameter) are dropped,
and ``trials`` of the rest are taken at evenly spaced ranks from the smallest to the largest, so
the trials cover the size range the budget leaves and the Pareto set has ends to choose from.
Deterministic: the same request proposes the same students.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError

from core.budget import student_parameters
from core.errors import InvalidSpec
from core.spec import (
    DatasetInfo,
    JobSpec,
    ModelInfo,
    Preset,
    StrictModel,
    StudentSpec,
    check_values,
    parse_spec,
)

MAX_TRIALS = 32
DEFAULT_TRIALS = 4
DEFAULT_WIDTHS = (16, 32, 64, 128, 256)
DEFAULT_DEPTHS = (1, 2, 3)
BYTES_PER_PARAMETER = 4  # fp32 weights: what a float student's file holds, give or take headers
# The fields of a search request that are not the base job spec.
SEARCH_FIELDS = ("budget", "trials", "space")

Method = Literal["kd", "mse", "dkd", "fitnet", "attention", "rkd"]


class SearchBudget(StrictModel):
    """What the delivered student may cost. Latency is the worker CPU's p50 at batch 1."""

    max_parameters: int | None = Field(default=None, ge=1)
    max_size_bytes: int | None = Field(default=None, ge=1)
    max_latency_ms: float | None = Field(default=None, gt=0)


class SearchSpace(StrictModel):
    """What candidates are drawn from; each list left out takes its default."""

    presets: list[Preset] | None = Field(default=None, min_length=1, max_length=4)
    widths: list[int] | None = Field(default=None, min_length=1, max_length=16)
    depths: list[int] | None = Field(default=None, min_length=1, max_length=16)
    methods: list[Method] | None = Field(default=None, min_length=1, max_length=6)


class SearchOptions(StrictModel):
    budget: SearchBudget = Field(default_factory=SearchBudget)
    trials: int = Field(default=DEFAULT_TRIALS, ge=1, le=MAX_TRIALS)
    space: SearchSpace = Field(default_factory=SearchSpace)


@dataclass(frozen=True)
class SearchRequest:
    """A parsed search: the base job spec (no student) and the search's own options."""

    spec: JobSpec
    options: SearchOptions


@dataclass(frozen=True)
class Candidate:
    """A proposed student with its method and closed-form size."""

    student: dict[str, Any]
    method: str
    parameters: int

    def as_dict(self) -> dict[str, Any]:
        return {"student": self.student, "method": self.method, "parameters": self.parameters}


def parse_search(body: Any) -> SearchRequest:
    """Validate a search body: the job spec's fields plus ``budget``, ``trials`` and ``space``."""
    if not isinstance(body, dict):
        raise InvalidSpec("the search must be a JSON object", field="")
    check_values(body)
    base = {k: v for k, v in body.items() if k not in SEARCH_FIELDS}
    for field in ("student", "stages"):
        if field in base:
            raise InvalidSpec(
                f"'{field}': a search proposes the students itself; remove it (narrow the "
                "candidates with 'space': presets, widths, depths, methods)",
                field=field,
            )
    spec = parse_spec(base)
    try:
        options = SearchOptions.model_validate({k: body[k] for k in SEARCH_FIELDS if k in body})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in error["loc"])
        raise InvalidSpec(f"'{field}': {error['msg']}", field=field) from None
    return SearchRequest(spec, options)


def default_presets(dataset: DatasetInfo) -> list[str]:
    """The presets the data can take: ``mlp`` always, ``cnn`` for float images."""
    sample = dataset.x_shape[1:]
    image = len(sample) in (2, 3) and all(d is not None for d in sample)
    return ["mlp", "cnn"] if image and dataset.x_dtype.startswith("float") else ["mlp"]


def takes(preset: str, dataset: DatasetInfo) -> bool:
    """Whether a preset student can take this dataset's inputs (as core/distill/students.py)."""
    sample = dataset.x_shape[1:]
    tokens = dataset.x_dtype.startswith(("int", "uint"))
    if preset == "mlp":
        return tokens or all(d is not None for d in sample)
    if preset in ("cnn", "resnet"):
        return not tokens and len(sample) in (2, 3)
    return (tokens and len(sample) == 1) or (not tokens and len(sample) == 2)


def _fitting(dataset: DatasetInfo) -> list[str]:
    return [p for p in ("mlp", "cnn", "resnet", "transformer") if takes(p, dataset)] or ["none"]


def propose(
    request: SearchRequest, teachers: list[ModelInfo], dataset: DatasetInfo
) -> tuple[list[Candidate], list[Candidate]]:
    """The candidates to run and those skipped because their size is over the budget."""
    space, budget = request.options.space, request.options.budget
    presets = space.presets or default_presets(dataset)
    for preset in presets:
        if not takes(preset, dataset):
            raise InvalidSpec(
                f"preset {preset} cannot take this dataset's x ({dataset.x_dtype} of shape "
                f"{['N', *dataset.x_shape[1:]]}); the data takes {', '.join(_fitting(dataset))}",
                field="space.presets",
            )
    widths = space.widths or list(DEFAULT_WIDTHS)
    depths = space.depths or list(DEFAULT_DEPTHS)
    base_method = request.spec.distillation.method if request.spec.distillation else None
    methods = space.methods or [base_method or "kd"]
    for name, values, top in (("widths", widths, 8192), ("depths", depths, 64)):
        if any(not 1 <= v <= top for v in values):
            raise InvalidSpec(f"'space.{name}': each must be 1..{top}", field=f"space.{name}")

    fits: list[Candidate] = []
    over: list[Candidate] = []
    for preset, width, depth, method in itertools.product(presets, widths, depths, methods):
        student = {"preset": preset, "width": width, "depth": depth}
        params = student_parameters(StudentSpec(**student), teachers, dataset)
        candidate = Candidate(student, method, params)
        (fits if _fits(params, budget) else over).append(candidate)
    fits.sort(key=lambda c: (c.parameters, c.student["preset"], c.method))
    return spread(fits, request.options.trials), over


def _fits(parameters: int, budget: SearchBudget) -> bool:
    if budget.max_parameters is not None and parameters > budget.max_parameters:
        return False
    size = parameters * BYTES_PER_PARAMETER
    return budget.max_size_bytes is None or size <= budget.max_size_bytes


def spread(items: list[Any], count: int) -> list[Any]:
    """``count`` items at evenly spaced ranks, first and last included (all if fewer)."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[len(items) // 2]]
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


def child_spec(request: SearchRequest, candidate: Candidate, label: str) -> dict[str, Any]:
    """The job spec of one trial: the base spec with the candidate's student and method.

    A trial exports only ONNX unless the base spec names its formats: that is the file a
    measured, deployable student needs.
    """
    data = request.spec.model_dump(mode="json", exclude_unset=True)
    data["student"] = dict(candidate.student)
    base = request.spec.distillation
    if base is not None and base.method == candidate.method:
        data["distillation"] = base.model_dump(mode="json")
    else:
        data["distillation"] = {"method": candidate.method}
    data.setdefault("export", ["onnx"])
    data["name"] = label
    return data


# --- the outcome ----------------------------------------------------------------------------


def quality(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """The metric a trial is ranked by (higher is better): accuracy, else agreement with the
    teacher, else cosine to it, else minus the MSE to it."""
    for name in ("accuracy", "agreement", "cosine"):
        if isinstance(metrics.get(name), int | float):
            return name, float(metrics[name])
    if isinstance(metrics.get("mse"), int | float):
        return "mse", -float(metrics["mse"])
    return None


def within_budget(trial: dict[str, Any], budget: SearchBudget) -> bool:
    """Whether a measured trial meets every limit of the budget."""
    limits = (
        ("parameters", budget.max_parameters),
        ("size_bytes", budget.max_size_bytes),
        ("latency_ms", budget.max_latency_ms),
    )
    for key, limit in limits:
        if limit is None:
            continue
        value = trial.get(key)
        if value is None or value > limit:
            return False
    return True


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """a is at least as good as b on score, latency and size, and better on one."""
    keys = (("score", 1), ("latency_ms", -1), ("size_bytes", -1))
    at_least = all(a[k] * sign >= b[k] * sign for k, sign in keys)
    better = any(a[k] * sign > b[k] * sign for k, sign in keys)
    return at_least and better


def pareto(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The measured trials no other trial dominates, in the order given."""
    measured = [t for t in trials if _measured(t)]
    return [t for t in measured if not any(dominates(o, t) for o in measured if o is not t)]


def best(trials: list[dict[str, Any]], budget: SearchBudget) -> dict[str, Any] | None:
    """The highest-scoring measured trial within the budget; ties go to the faster, then the
    smaller (so the best is always on the Pareto front)."""
    fit = [t for t in trials if _measured(t) and within_budget(t, budget)]
    if not fit:
        return None
    return max(fit, key=lambda t: (t["score"], -t["latency_ms"], -t["size_bytes"]))


def _measured(trial: dict[str, Any]) -> bool:
    return all(trial.get(k) is not None for k in ("score", "latency_ms", "size_bytes"))


def trial_row(
    job_id: str, status: str, spec: dict[str, Any], result: dict[str, Any] | None, error: Any
) -> dict[str, Any]:
    """One trial as the search reports it, from its child job's columns."""
    student = {k: v for k, v in (spec.get("student") or {}).items() if k in _STUDENT_KEYS and v}
    row: dict[str, Any] = {
        "job_id": job_id,
        "status": status,
        "student": student,
        "method": (spec.get("distillation") or {}).get("method"),
        "metric": None,
        "score": None,
        "accuracy": None,
        "parameters": None,
        "size_bytes": None,
        "latency_ms": None,
        "baseline_accuracy": None,
        "error": (error or {}).get("code") if isinstance(error, dict) else None,
    }
    metrics = (result or {}).get("student") or {}
    if status == "succeeded" and metrics:
        scored = quality(metrics)
        if scored is not None:
            row["metric"], row["score"] = scored
        row["accuracy"] = metrics.get("accuracy")
        row["parameters"] = metrics.get("parameters")
        row["size_bytes"] = metrics.get("size_bytes")
        row["latency_ms"] = metrics.get("latency_ms_p50")
        row["baseline_accuracy"] = ((result or {}).get("baseline") or {}).get("accuracy")
    return row


_STUDENT_KEYS = ("preset", "width", "depth", "heads")


def summarise(
    trials: list[dict[str, Any]], budget: SearchBudget, skipped: list[dict[str, Any]]
) -> dict[str, Any]:
    """The search's result: every trial, the Pareto set and the best within the budget."""
    front = pareto(trials)
    front_ids = {t["job_id"] for t in front}
    chosen = best(trials, budget)
    for trial in trials:
        trial["pareto"] = trial["job_id"] in front_ids
        trial["within_budget"] = _measured(trial) and within_budget(trial, budget)
        trial["best"] = chosen is not None and trial["job_id"] == chosen["job_id"]
    result: dict[str, Any] = {
        "budget": budget.model_dump(),
        "trials": trials,
        "pareto": [t["job_id"] for t in front],
        "best_job_id": chosen["job_id"] if chosen else None,
        "skipped": skipped,
    }
    if chosen is None:
        result["message"] = (
            "no trial met the budget; give a larger budget, or narrow the space to smaller students"
            if any(_measured(t) for t in trials)
            else "no trial finished with a measured student"
        )
    return result
