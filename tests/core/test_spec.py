"""The job spec: defaults filled in, wrong fields named, shapes checked against teacher and data."""

from __future__ import annotations

import pytest

from core.errors import InvalidSpec, ShapeMismatch
from core.spec import DatasetInfo, ModelInfo, TensorInfo, complete_spec, parse_spec

TEACHER = ModelInfo(
    format="exported_program",
    inputs=[TensorInfo(shape=[None, 1, 8, 8], dtype="float32")],
    outputs=[TensorInfo(shape=[None, 10], dtype="float32")],
)
DIGITS = DatasetInfo(
    n_samples=1000,
    x_shape=[None, 1, 8, 8],
    x_dtype="float32",
    has_labels=True,
    n_classes=10,
    y_shape=[None],
)
MINIMAL = {"teacher": {"model_id": "mdl_1"}, "dataset_id": "ds_1"}


def field_of(data: dict) -> str:
    with pytest.raises(InvalidSpec) as info:
        parse_spec(data)
    assert info.value.code == "invalid_spec"
    return info.value.field or ""


def test_minimal_spec_gets_a_useful_default_student_and_method() -> None:
    spec = complete_spec(parse_spec(MINIMAL), [TEACHER], DIGITS)
    assert spec.task == "classification"
    assert spec.distillation.method == "kd"
    assert spec.student.preset == "mlp" and spec.student.width == 128
    assert spec.export == ["torchscript", "onnx", "safetensors"]


def test_training_settings_are_chosen_from_the_data_and_shown_as_auto() -> None:
    completed = complete_spec(parse_spec(MINIMAL), [TEACHER], DIGITS).model_dump(mode="json")
    training = completed["training"]
    # 900 training samples: batches of 32 (29 steps an epoch), 2000 steps' worth of epochs.
    assert training["batch_size"] == {"auto": 32}
    assert training["epochs"] == {"auto": 69}
    assert training["warmup_epochs"]["auto"] > 0
    assert training["early_stopping_patience"] == {"auto": 23}
    assert training["lr"] == "auto"  # found on the data when the job runs
    # The completed spec sent again is the same spec: chosen values are used as given.
    again = complete_spec(parse_spec(completed), [TEACHER], DIGITS).model_dump(mode="json")
    assert again == completed


def test_explicit_training_values_are_never_overridden() -> None:
    pinned = {"epochs": 7, "batch_size": 50, "lr": 0.002, "warmup_epochs": 0}
    spec = complete_spec(
        parse_spec({**MINIMAL, "training": {**pinned, "early_stopping_patience": None}}),
        [TEACHER],
        DIGITS,
    )
    training = spec.model_dump(mode="json")["training"]
    assert {k: training[k] for k in pinned} == pinned
    assert training["early_stopping_patience"] is None


def test_small_datasets_get_small_batches() -> None:
    wine = DIGITS.model_copy(update={"n_samples": 124, "x_shape": [None, 13], "n_classes": 3})
    teacher = TEACHER.model_copy(
        update={
            "inputs": [TensorInfo(shape=[None, 13], dtype="float32")],
            "outputs": [TensorInfo(shape=[None, 3], dtype="float32")],
        }
    )
    spec = complete_spec(parse_spec(MINIMAL), [teacher], wine)
    assert spec.training.batch_size == 8 and spec.training.epochs * 14 >= 2000


@pytest.mark.parametrize(
    ("teacher_parameters", "at_most"),
    [(90_000, 9_000), (5_000, 2_500), (700, 700)],  # 10×, else 2×, else a linear model
)
def test_default_student_is_ten_times_smaller_than_the_teacher_where_it_can_be(
    teacher_parameters: int, at_most: int
) -> None:
    from core.recipe import mlp_parameters

    teacher = TEACHER.model_copy(update={"parameters": teacher_parameters})
    student = complete_spec(parse_spec(MINIMAL), [teacher], DIGITS).student
    assert student is not None
    dumped = student.model_dump(mode="json")
    assert "auto" in dumped["width"] and "auto" in dumped["depth"]
    assert mlp_parameters(64, 10, student.width, student.depth) <= at_most


def test_a_given_student_is_kept_whatever_the_teacher_size() -> None:
    teacher = TEACHER.model_copy(update={"parameters": 1_000})
    spec = complete_spec(
        parse_spec({**MINIMAL, "student": {"preset": "mlp", "width": 256}}), [teacher], DIGITS
    )
    assert spec.student is not None and (spec.student.width, spec.student.depth) == (256, 2)


def test_tune_searches_the_settings_left_at_their_defaults() -> None:
    body = {
        **MINIMAL,
        "distillation": {"method": "kd", "temperature": 2.0},
        "training": {"tune": {"trials": 5}},
    }
    completed = complete_spec(parse_spec(body), [TEACHER], DIGITS).model_dump(mode="json")
    assert completed["distillation"]["temperature"] == 2.0  # given: never tuned
    assert completed["distillation"]["alpha"] == "auto"
    assert completed["training"]["lr"] == "auto" and completed["training"]["weight_decay"] == "auto"
    assert completed["training"]["tune"] == {"trials": 5, "budget_minutes": None}


def test_tune_needs_a_single_student() -> None:
    body = {
        **MINIMAL,
        "stages": [{"student": {"preset": "mlp"}}, {"student": {"preset": "mlp", "width": 8}}],
        "training": {"tune": {"trials": 2}},
    }
    with pytest.raises(InvalidSpec) as info:
        complete_spec(parse_spec(body), [TEACHER], DIGITS)
    assert info.value.field == "training.tune"


def test_regression_targets_choose_mse() -> None:
    data = DIGITS.model_copy(update={"y_shape": [None, 10]})
    spec = complete_spec(parse_spec(MINIMAL), [TEACHER], data)
    assert spec.task == "regression" and spec.distillation.method == "mse"


def test_kd_is_refused_for_regression() -> None:
    spec = parse_spec({**MINIMAL, "task": "regression", "distillation": {"method": "kd"}})
    with pytest.raises(InvalidSpec) as info:
        complete_spec(spec, [TEACHER], DIGITS)
    assert info.value.field == "distillation.method"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**MINIMAL, "distillation": {"method": "kd", "temprature": 3}}, "distillation.temprature"),
        ({**MINIMAL, "training": {"epochs": 10**9}}, "training.epochs"),
        ({**MINIMAL, "student": {"preset": "mlp", "widht": 3}}, "student.widht"),
        ({"dataset_id": "ds_1"}, "teacher"),
        ({**MINIMAL, "teacher": {}}, "teacher"),
        ({**MINIMAL, "student": {"preset": "mlp"}, "stages": [{"student": {}}]}, "stages"),
        ({**MINIMAL, "training": {"device": "tpu"}}, "training.device"),
        ({**MINIMAL, "compression": {"quantize": "int3"}}, "compression.quantize"),
    ],
)
def test_wrong_fields_are_named(data: dict, field: str) -> None:
    assert field_of(data) == field


def test_shape_mismatch_names_the_teacher() -> None:
    flat = DIGITS.model_copy(update={"x_shape": [None, 64]})
    with pytest.raises(ShapeMismatch) as info:
        complete_spec(parse_spec(MINIMAL), [TEACHER], flat)
    assert info.value.field == "teacher"
    assert "[N, 1, 8, 8]" in info.value.message.replace("'", "")


def test_more_classes_than_teacher_outputs_is_refused() -> None:
    many = DIGITS.model_copy(update={"n_classes": 12})
    with pytest.raises(ShapeMismatch, match="12 classes"):
        complete_spec(parse_spec(MINIMAL), [TEACHER], many)


def test_batch_larger_than_the_data_is_refused() -> None:
    small = DIGITS.model_copy(update={"n_samples": 50})
    with pytest.raises(InvalidSpec) as info:
        complete_spec(parse_spec({**MINIMAL, "training": {"batch_size": 128}}), [TEACHER], small)
    assert info.value.field == "training.batch_size"


def test_unknown_teacher_output_shape_skips_the_class_check() -> None:
    torchscript = TEACHER.model_copy(update={"outputs": [TensorInfo(shape=None, dtype="float32")]})
    spec = complete_spec(parse_spec(MINIMAL), [torchscript], DIGITS)
    assert spec.task == "classification"


def test_stages_form_the_chain_and_the_last_is_the_result() -> None:
    spec = parse_spec(
        {**MINIMAL, "stages": [{"student": {"preset": "cnn"}}, {"student": {"preset": "mlp"}}]}
    )
    chain = complete_spec(spec, [TEACHER], DIGITS).chain()
    assert [s.student.preset for s in chain] == ["cnn", "mlp"]
    assert chain[0].student.width == 32


def test_ensemble_teachers_must_agree_on_output_shape() -> None:
    other = TEACHER.model_copy(update={"outputs": [TensorInfo(shape=[None, 5], dtype="float32")]})
    spec = parse_spec(
        {"teachers": [{"model_id": "a"}, {"model_id": "b", "weight": 2}], "dataset_id": "d"}
    )
    with pytest.raises(ShapeMismatch) as info:
        complete_spec(spec, [TEACHER, other], DIGITS)
    assert info.value.field == "teachers.1"


@pytest.mark.parametrize("method", ["fitnet", "attention", "rkd"])
def test_a_feature_method_with_a_torchscript_teacher_is_refused_up_front(method: str) -> None:
    torchscript = TEACHER.model_copy(update={"format": "torchscript"})
    spec = parse_spec({**MINIMAL, "distillation": {"method": method}})
    with pytest.raises(InvalidSpec) as info:
        complete_spec(spec, [torchscript], DIGITS)
    assert info.value.field == "distillation.method"
    assert "exported_program" in str(info.value)
    complete_spec(spec, [TEACHER], DIGITS)  # an exported program's layers can be read
    kd = parse_spec({**MINIMAL, "distillation": {"method": "kd"}})
    complete_spec(kd, [torchscript], DIGITS)  # and output methods need no layers


def test_a_feature_method_with_an_ensemble_is_refused_up_front() -> None:
    spec = parse_spec(
        {
            "teachers": [{"model_id": "a"}, {"model_id": "b"}],
            "dataset_id": "d",
            "stages": [
                {"student": {"preset": "cnn"}, "distillation": {"method": "fitnet"}},
                {"student": {"preset": "mlp"}},
            ],
        }
    )
    with pytest.raises(InvalidSpec) as info:
        complete_spec(spec, [TEACHER, TEACHER], DIGITS)
    assert info.value.field == "stages.0.distillation.method"


def test_a_later_stage_may_use_a_feature_method_whatever_the_teacher() -> None:
    """Stage 2's teacher is stage 1's student, whose layers can always be read."""
    torchscript = TEACHER.model_copy(update={"format": "torchscript"})
    spec = parse_spec(
        {
            **MINIMAL,
            "stages": [
                {"student": {"preset": "cnn"}},
                {"student": {"preset": "mlp"}, "distillation": {"method": "rkd"}},
            ],
        }
    )
    complete_spec(spec, [torchscript], DIGITS)


TABULAR = DatasetInfo(
    n_samples=500, x_shape=[None, 30], x_dtype="float32", has_labels=True, n_classes=2
)
FOREST = ModelInfo(
    format="onnx",
    inputs=[TensorInfo(shape=[None, 30], dtype="float32")],
    outputs=[TensorInfo(shape=[None, 2], dtype="float32")],
    has_default_features=False,
)


@pytest.mark.parametrize(
    ("student", "data", "refused"),
    [
        ({"preset": "cnn"}, TABULAR, True),
        ({"preset": "resnet"}, TABULAR, True),
        ({"preset": "transformer"}, TABULAR, True),
        ({"preset": "mlp"}, TABULAR, False),
        ({"preset": "cnn"}, DIGITS, False),
    ],
)
def test_a_preset_the_data_cannot_feed_is_refused_up_front(
    student: dict, data: DatasetInfo, refused: bool
) -> None:
    teacher = FOREST if data is TABULAR else TEACHER
    spec = parse_spec({**MINIMAL, "student": student})
    if not refused:
        complete_spec(spec, [teacher], data)
        return
    with pytest.raises(InvalidSpec) as info:
        complete_spec(spec, [teacher], data)
    assert info.value.field == "student.preset" and "'N', 30" in info.value.message


def test_data_that_is_not_a_tensor_yet_is_left_to_the_worker() -> None:
    text = DatasetInfo(n_samples=1000, x_shape=[None], x_dtype="str", has_labels=False)
    teacher = FOREST.model_copy(update={"inputs": [TensorInfo(shape=None, dtype="str")]})
    complete_spec(parse_spec({**MINIMAL, "student": {"preset": "cnn"}}), [teacher], text)


@pytest.mark.parametrize("method", ["fitnet", "attention", "rkd"])
def test_a_feature_method_with_an_onnx_teacher_without_features_is_refused(method: str) -> None:
    spec = parse_spec({**MINIMAL, "distillation": {"method": method}})
    with pytest.raises(InvalidSpec, match="penultimate features") as info:
        complete_spec(spec, [FOREST], TABULAR)
    assert info.value.field == "distillation.method"
    # Not recorded (an older upload): left to the worker. Named hints: the user's choice.
    complete_spec(spec, [FOREST.model_copy(update={"has_default_features": None})], TABULAR)
    if method != "rkd":
        hinted = {"method": method, "hints": [{"teacher": "t", "student": "body.0"}]}
        complete_spec(parse_spec({**MINIMAL, "distillation": hinted}), [FOREST], TABULAR)


def test_model_refs_name_every_teacher_and_uploaded_student_with_its_field() -> None:
    spec = parse_spec(
        {
            "teachers": [{"model_id": "t1"}, {"path": "t2.pt2", "weight": 2}],
            "dataset_id": "d",
            "stages": [
                {"student": {"model_id": "assistant"}},
                {"student": {"preset": "mlp"}},
                {"student": {"path": "student.pt2"}},
            ],
        }
    )
    assert [(r.field, r.key) for r in spec.model_refs()] == [
        ("teachers.0", "t1"),
        ("teachers.1", "t2.pt2"),
        ("stages.0.student", "assistant"),
        ("stages.2.student", "student.pt2"),
    ]
    plain = parse_spec(MINIMAL)
    assert [(r.field, r.key) for r in plain.model_refs()] == [("teacher", "mdl_1")]
    assert plain.student_fields() == [] and plain.student_field() == "student"
    assert spec.student_field(1) == "stages.1.student"


def test_an_unknown_method_or_the_baseline_is_refused_naming_the_method_field() -> None:
    assert field_of({**MINIMAL, "distillation": {"method": "magic"}}) == "distillation.method"
    with pytest.raises(InvalidSpec, match="use one of: kd, mse"):
        parse_spec({**MINIMAL, "distillation": {"method": "magic"}})
    stages = {"stages": [{"student": {"preset": "mlp"}, "distillation": {"method": "baseline"}}]}
    assert field_of({**MINIMAL, **stages}) == "stages.0.distillation.method"
    with pytest.raises(InvalidSpec, match="training.baseline"):
        parse_spec({**MINIMAL, "distillation": {"method": "baseline"}})


def test_method_flags_say_what_each_method_needs() -> None:
    from core.spec import METHOD_SPECS, method_names

    assert method_names(reads_features=True) == ["fitnet", "attention", "rkd", "hidden"]
    assert method_names(needs_prompts=True) == ["seqkd", "gkd"]
    assert set(method_names(causal_only=True)) <= set(method_names(causal_lm=True))
    assert method_names(needs_teacher=False) == ["baseline"]
    assert all(cls.model_fields["method"].default == n for n, cls in METHOD_SPECS.items())
