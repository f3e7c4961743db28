"""Job budgets: the estimates match the students the engine builds, the defaults refuse the
jobs that would hold a worker for days and pass every spec the project ships."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.budget import check_budget, estimate_job
from core.config import Settings
from core.distill.students import build_student, count_parameters
from core.errors import OverBudget
from core.spec import DatasetInfo, ModelInfo, StudentSpec, complete_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
TEACHER = ModelInfo(
    format="exported_program",
    inputs=[{"shape": [None, 1, 8, 8], "dtype": "float32"}],
    outputs=[{"shape": [None, 10], "dtype": "float32"}],
)
DIGITS = DatasetInfo(
    n_samples=1797,
    x_shape=[None, 1, 8, 8],
    x_dtype="float32",
    has_labels=True,
    n_classes=10,
    y_shape=[None],
)
BASE = {"teacher": {"model_id": "mdl_t"}, "dataset_id": "ds_d"}
# Sequences of 32 token ids, for the transformer student (images are refused for it earlier).
TOKEN_TEACHER = ModelInfo(
    format="exported_program",
    inputs=[{"shape": [None, 32], "dtype": "int64"}],
    outputs=[{"shape": [None, 10], "dtype": "float32"}],
)
TOKENS = DatasetInfo(
    n_samples=1797, x_shape=[None, 32], x_dtype="int64", has_labels=True, n_classes=10
)


def _estimate(spec: dict, dataset: DatasetInfo = DIGITS, teacher: ModelInfo = TEACHER):  # noqa: ANN202
    completed = complete_spec(parse_spec({**BASE, **spec}), [teacher], dataset)
    return completed, estimate_job(completed, [teacher], dataset)


@pytest.mark.parametrize(
    ("preset", "width", "depth", "shape", "dtype"),
    [
        ("mlp", 64, 3, [1, 8, 8], "float32"),
        ("mlp", 32, 2, [20], "int64"),
        ("cnn", 16, 3, [3, 32, 32], "float32"),
        ("cnn", 8, 5, [8, 8], "float32"),
        ("resnet", 16, 2, [3, 32, 32], "float32"),
        ("transformer", 64, 2, [20], "int64"),
        ("transformer", 32, 2, [10, 6], "float32"),
    ],
)
def test_parameter_estimate_is_the_built_students_count(
    preset: str, width: int, depth: int, shape: list[int], dtype: str
) -> None:
    student = StudentSpec(preset=preset, width=width, depth=depth)  # type: ignore[arg-type]
    built = build_student(student, input_shape=shape, input_dtype=dtype, output_dim=10)
    dataset = DatasetInfo(
        n_samples=1000, x_shape=[None, *shape], x_dtype=dtype, has_labels=True, n_classes=10
    )
    spec = {"student": {"preset": preset, "width": width, "depth": depth}, "task": "classification"}
    teacher = ModelInfo(
        format="exported_program",
        inputs=[{"shape": [None, *shape], "dtype": dtype}],
        outputs=[{"shape": [None, 10], "dtype": "float32"}],
    )
    completed = complete_spec(parse_spec({**BASE, **spec}), [teacher], dataset)
    estimate = estimate_job(completed, [teacher], dataset)
    assert estimate.parameters == count_parameters(built)


def test_steps_count_every_stage_and_the_baseline() -> None:
    _, plain = _estimate({"training": {"epochs": 10, "batch_size": 100, "baseline": False}})
    # 1797 samples, 10% held out: 1617 to train on, 17 batches of 100.
    assert plain.optimizer_steps == 10 * 17
    _, staged = _estimate(
        {"stages": [{"student": {"width": 64}}] * 3, "training": {"epochs": 10, "batch_size": 100}}
    )
    assert staged.optimizer_steps == (3 + 1) * 10 * 17


ISSUE_EXAMPLES = {
    "mlp 8192 x 64": ({"student": {"preset": "mlp", "width": 8192, "depth": 64}}, "parameters"),
    "8 stages of it": (
        {"stages": [{"student": {"preset": "mlp", "width": 8192, "depth": 64}}] * 8},
        "parameters",
    ),
    "transformer 8192 x 64": (
        {"student": {"preset": "transformer", "width": 8192, "depth": 64, "heads": 64}},
        "parameters",
    ),
    "10,000 epochs at batch 1 for a week": (
        {"training": {"epochs": 10_000, "batch_size": 1, "max_minutes": 10_080}},
        "optimizer_steps",
    ),
    "10,000 epochs at batch 1": (
        {"training": {"epochs": 10_000, "batch_size": 1}},
        "optimizer_steps",
    ),
    "a week": ({"training": {"max_minutes": 10_080}}, "max_minutes"),
}


@pytest.mark.parametrize("name", list(ISSUE_EXAMPLES))
def test_default_budget_refuses_jobs_that_hold_a_worker_for_days(name: str) -> None:
    spec, limit = ISSUE_EXAMPLES[name]
    teacher, dataset = (TOKEN_TEACHER, TOKENS) if "transformer" in name else (TEACHER, DIGITS)
    completed, _ = _estimate(spec, dataset, teacher)
    with pytest.raises(OverBudget) as info:
        check_budget(completed, [teacher], dataset, Settings())
    details = info.value.details
    assert limit in details["limit"] and details["estimate"][limit] > details["limit"][limit]
    assert info.value.code == "over_budget" and "limit" in info.value.message


def test_memory_over_the_job_limit_is_refused() -> None:
    completed, estimate = _estimate(
        {"student": {"preset": "mlp", "width": 4096, "depth": 4}, "training": {"batch_size": 512}}
    )
    assert estimate.parameters < Settings().max_student_parameters  # type: ignore[operator]
    with pytest.raises(OverBudget) as info:
        check_budget(completed, [TEACHER], DIGITS, Settings(job_memory_mb=256))
    assert info.value.details["limit"] == {"memory_mb": 256}
    assert info.value.details["field"] == "training.batch_size"
    check_budget(completed, [TEACHER], DIGITS, Settings(job_memory_mb=estimate.memory_mb))


def test_the_shipped_example_and_largest_documented_students_pass() -> None:
    spec = yaml.safe_load((ROOT / "examples" / "digits" / "spec.yaml").read_text())
    spec = {k: v for k, v in spec.items() if k not in ("teacher", "dataset_path", "dataset_id")}
    for extra in (
        spec,
        {"student": {"preset": "mlp", "width": 1536, "depth": 8}},
        {"student": {"preset": "resnet", "width": 64, "depth": 4}},
        {"student": {"preset": "cnn", "width": 256, "depth": 6}},
        {"training": {"epochs": 500, "batch_size": 32}},
    ):
        completed, _ = _estimate(extra)
        check_budget(completed, [TEACHER], DIGITS, Settings())


def test_default_job_memory_shares_the_machine_between_concurrent_jobs() -> None:
    one, four = Settings(worker_concurrency=1), Settings(worker_concurrency=4)
    assert one.job_memory_mb is not None and four.job_memory_mb is not None
    assert 256 <= four.job_memory_mb < one.job_memory_mb
    assert abs(one.job_memory_mb / 4 - four.job_memory_mb) <= 1
    assert Settings(job_memory_mb=1000, worker_concurrency=4).job_memory_mb == 1000
