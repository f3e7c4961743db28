"""Budget search logic: the proposal, the Pareto set and the best student within budget."""

from __future__ import annotations

from typing import Any

import pytest

from core.budget import student_parameters
from core.errors import InvalidSpec
from core.search import (
    SearchBudget,
    best,
    child_spec,
    pareto,
    parse_search,
    propose,
    spread,
    summarise,
    trial_row,
)
from core.spec import DatasetInfo, ModelInfo, StudentSpec, TensorInfo

DIGITS = DatasetInfo(
    n_samples=1257, x_shape=[None, 1, 8, 8], x_dtype="float32", has_labels=True, n_classes=10
)
TABULAR = DatasetInfo(
    n_samples=500, x_shape=[None, 30], x_dtype="float32", has_labels=True, n_classes=2
)
TEACHER = ModelInfo(
    format="onnx",
    inputs=[TensorInfo(shape=[None, 1, 8, 8], dtype="float32")],
    outputs=[TensorInfo(shape=[None, 10], dtype="float32")],
)


def _search(**extra: Any) -> Any:
    return parse_search({"teacher": {"model_id": "m"}, "dataset_id": "d", **extra})


def test_proposal_spreads_over_the_sizes_the_budget_leaves() -> None:
    request = _search(budget={"max_parameters": 30_000}, trials=4)
    run, over = propose(request, [TEACHER], DIGITS)
    sizes = [c.parameters for c in run]
    assert len(run) == 4 and sizes == sorted(sizes)
    assert all(s <= 30_000 for s in sizes) and all(c.parameters > 30_000 for c in over)
    # The ends of what fits: the smallest student of the grid and the largest within budget.
    grid = [
        student_parameters(StudentSpec(preset=p, width=w, depth=d), [TEACHER], DIGITS)
        for p in ("mlp", "cnn")
        for w in (16, 32, 64, 128, 256)
        for d in (1, 2, 3)
    ]
    assert sizes[0] == min(grid) and sizes[-1] == max(g for g in grid if g <= 30_000)
    assert len(over) == sum(g > 30_000 for g in grid)
    assert {c.student["preset"] for c in run + over} == {"mlp", "cnn"}  # images take both
    # Deterministic.
    assert [c.as_dict() for c in propose(request, [TEACHER], DIGITS)[0]] == [
        c.as_dict() for c in run
    ]


def test_proposal_estimates_match_the_budget_module() -> None:
    run, _ = propose(_search(trials=3), [TEACHER], DIGITS)
    for c in run:
        assert c.parameters == student_parameters(StudentSpec(**c.student), [TEACHER], DIGITS)


def test_size_budget_counts_four_bytes_a_parameter() -> None:
    run, over = propose(_search(budget={"max_size_bytes": 40_000}), [TEACHER], DIGITS)
    assert all(c.parameters * 4 <= 40_000 for c in run)
    assert all(c.parameters * 4 > 40_000 for c in over)


def test_tabular_data_gets_mlps_and_a_cnn_is_refused() -> None:
    run, over = propose(_search(trials=20), [TEACHER], TABULAR)
    assert {c.student["preset"] for c in run + over} == {"mlp"}
    with pytest.raises(InvalidSpec) as caught:
        propose(_search(space={"presets": ["cnn"]}), [TEACHER], TABULAR)
    assert caught.value.field == "space.presets"


def test_space_and_methods() -> None:
    request = _search(
        space={"presets": ["mlp"], "widths": [8, 16], "depths": [1], "methods": ["kd", "dkd"]},
        trials=10,
    )
    run, _ = propose(request, [TEACHER], DIGITS)
    assert sorted((c.student["width"], c.method) for c in run) == [
        (8, "dkd"),
        (8, "kd"),
        (16, "dkd"),
        (16, "kd"),
    ]
    spec = child_spec(request, run[0], "s trial 1")
    assert spec["student"] == run[0].student and spec["distillation"] == {"method": run[0].method}
    assert spec["export"] == ["onnx"] and spec["name"] == "s trial 1"


def test_child_keeps_the_base_method_settings_and_exports() -> None:
    request = _search(distillation={"method": "kd", "temperature": 2.0}, export=["torchscript"])
    candidate = propose(request, [TEACHER], DIGITS)[0][0]
    spec = child_spec(request, candidate, "x")
    assert spec["distillation"]["temperature"] == 2.0 and spec["export"] == ["torchscript"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"student": {"preset": "mlp"}}, "student"),
        ({"trials": 100}, "trials"),
        ({"budget": {"max_parameters": 0}}, "budget.max_parameters"),
        ({"budget": {"seconds": 1}}, "budget.seconds"),
        ({"training": {"epochs": 0}}, "training.epochs"),
    ],
)
def test_parse_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        _search(**body)
    assert caught.value.field == field


def test_spread() -> None:
    assert spread(list(range(10)), 4) == [0, 3, 6, 9]
    assert spread([1, 2], 4) == [1, 2]
    assert spread([1, 2, 3], 1) == [2]


def _trial(job: str, score: float, latency: float, size: int) -> dict[str, Any]:
    return {"job_id": job, "score": score, "latency_ms": latency, "size_bytes": size}


def test_pareto_keeps_only_the_undominated() -> None:
    trials = [
        _trial("a", 0.90, 1.0, 100),
        _trial("b", 0.95, 2.0, 200),
        _trial("c", 0.89, 1.5, 150),  # dominated by a
        _trial("d", 0.95, 2.0, 300),  # dominated by b (larger, no better)
        _trial("e", 0.80, 0.5, 500),  # fastest: kept
        {"job_id": "f", "score": None, "latency_ms": None, "size_bytes": None},  # failed
    ]
    assert [t["job_id"] for t in pareto(trials)] == ["a", "b", "e"]


def test_best_is_the_most_accurate_within_budget_and_on_the_front() -> None:
    trials = [
        _trial("a", 0.90, 1.0, 100),
        _trial("b", 0.95, 2.0, 200),
        _trial("c", 0.90, 0.8, 100),
    ]
    assert best(trials, SearchBudget(max_latency_ms=1.5))["job_id"] == "c"  # tie: the faster
    assert best(trials, SearchBudget())["job_id"] == "b"
    assert best(trials, SearchBudget(max_latency_ms=0.1)) is None
    result = summarise(trials, SearchBudget(max_latency_ms=0.1), [])
    assert result["best_job_id"] is None and "no trial met the budget" in result["message"]
    result = summarise(trials, SearchBudget(max_latency_ms=1.5), [])
    assert result["best_job_id"] in result["pareto"]


def test_trial_row_reads_a_job_result() -> None:
    spec = {"student": {"preset": "mlp", "width": 32, "depth": 1, "dropout": 0.0}}
    spec["distillation"] = {"method": "kd"}
    result = {
        "student": {
            "accuracy": 0.9,
            "parameters": 2410,
            "size_bytes": 11_000,
            "latency_ms_p50": 0.07,
        },
        "baseline": {"accuracy": 0.88},
    }
    row = trial_row("job_1", "succeeded", spec, result, None)
    assert row["student"] == {"preset": "mlp", "width": 32, "depth": 1}
    assert (row["metric"], row["score"], row["latency_ms"]) == ("accuracy", 0.9, 0.07)
    assert row["baseline_accuracy"] == 0.88
    failed = trial_row("job_2", "failed", spec, None, {"code": "timeout", "message": "m"})
    assert failed["score"] is None and failed["error"] == "timeout"
