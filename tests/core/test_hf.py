"""Hugging Face teachers and students in the engine: the hf archive's checks, text datasets,
students made from the teacher, the hidden and attention losses, and whole jobs.

Models are tiny BERTs built from a config with a WordPiece tokenizer trained here
(tests/core/hf_files.py); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from core.distill.formats import detect_format
from core.distill.hf.models import HFModel, encode
from core.distill.hf.students import build_hf_student, layer_choice
from core.distill.hf.text import load_text_transfer_set
from core.distill.methods.attention_kl import attention_kl
from core.distill.methods.hf_layers import layer_map
from core.distill.methods.hidden import hidden_loss
from core.distill.pipeline import run_job
from core.distill.teachers import load_teacher
from core.distill.types import ModelFile
from core.errors import DatasetInvalid, InvalidSpec, ModelInvalid, UnsafeModelFile
from core.spec import (
    DatasetInfo,
    FromTeacher,
    ModelInfo,
    StudentSpec,
    complete_spec,
    parse_spec,
)
from tests.core.hf_files import (
    LABELS,
    paragraphs,
    tiny_bert,
    train_classifier,
    train_tokenizer,
    write_jsonl,
    zip_folder,
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A 2-layer BERT classifier of the three sections, fine-tuned for a few seconds."""
    folder = tiny_bert(tmp_path_factory.mktemp("teacher") / "bert", tokenizer=tokenizer)
    assert train_classifier(folder) > 0.8
    return folder


@pytest.fixture(scope="module")
def teacher_zip(teacher_dir: Path) -> Path:
    return zip_folder(teacher_dir, teacher_dir.parent / "teacher.zip", top="bert")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [{"text": text, "label": label} for text, label in paragraphs()]
    return write_jsonl(tmp_path_factory.mktemp("data") / "topics.jsonl", rows)


# --- the archive -------------------------------------------------------------------------------


def _rezip(folder: Path, path: Path, extra: dict[str, bytes] | None = None, **config: Any) -> Path:
    """A copy of a model folder's zip with extra files and config.json entries changed."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(folder.iterdir()):
            data = file.read_bytes()
            if file.name == "config.json":
                data = json.dumps({**json.loads(data), **config}).encode()
            zf.writestr(file.name, data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def test_archive_detected_and_refusals_say_what_to_do(teacher_dir: Path, tmp_path: Path) -> None:
    assert detect_format(zip_folder(teacher_dir, tmp_path / "ok.zip")) == "hf"
    assert detect_format(zip_folder(teacher_dir, tmp_path / "top.zip", top="m"), "hf") == "hf"
    from client.sdk import _zip_folder  # what the SDK and CLI send for a folder

    assert detect_format(_zip_folder(teacher_dir, tmp_path / "sdk.zip")) == "hf"

    with pytest.raises(UnsafeModelFile, match=r"safe_serialization=True"):
        detect_format(_rezip(teacher_dir, tmp_path / "bin.zip", {"pytorch_model.bin": b"x"}))
    with pytest.raises(ModelInvalid, match="remove 'auto_map'"):
        detect_format(_rezip(teacher_dir, tmp_path / "am.zip", auto_map={"AutoModel": "m.M"}))
    with pytest.raises(ModelInvalid, match="custom code"):
        detect_format(_rezip(teacher_dir, tmp_path / "py.zip", {"modeling_x.py": b"import os"}))
    with pytest.raises(ModelInvalid, match="'NoSuchBertModel' does not exist"):
        detect_format(_rezip(teacher_dir, tmp_path / "arch.zip", architectures=["NoSuchBertModel"]))
    with pytest.raises(UnsafeModelFile, match="escapes its folder"):
        detect_format(_rezip(teacher_dir, tmp_path / "esc.zip", {"../../evil.json": b"{}"}))


def test_teacher_signature_and_features(teacher_zip: Path) -> None:
    teacher = load_teacher(ModelFile(teacher_zip, "hf"))
    hf = teacher.info.hf
    assert hf is not None
    assert hf["task"] == "sequence_classification" and hf["num_labels"] == 3
    assert hf["id2label"] == {"0": "compound", "1": "expressions", "2": "data"}
    assert hf["num_layers"] == 2 and hf["hidden_size"] == 64
    x = encode(teacher.tokenizer, ["the for statement", "a string literal"], 16)
    out, feats = teacher.features(x, ["hidden_states.0", "hidden_states.2", "attentions.1"])
    assert out.shape == (2, 3)
    assert feats["hidden_states.2"].shape == (2, x.shape[-1], 64)
    assert feats["attentions.1"].shape == (2, 4, x.shape[-1], x.shape[-1])
    assert torch.allclose(feats["attentions.1"].sum(-1), torch.ones(2, 4, x.shape[-1]))


# --- text datasets -----------------------------------------------------------------------------


def test_jsonl_labels_by_the_teachers_names(tokenizer: Any, tmp_path: Path) -> None:
    rows = [
        {"text": "if x: pass", "label": "data"},
        {"text": "a while loop", "label": 0},
        {"text": "no label here"},
        {"text": "minus one is unlabeled", "label": -1},
    ]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    id2label = {str(i): name for i, name in enumerate(LABELS)}
    ts = load_text_transfer_set(path, tokenizer, max_length=8, id2label=id2label, val_fraction=0)
    assert ts.y_train is not None and ts.y_train.tolist() == [2, 0, -1, -1]  # data is id 2
    assert ts.class_names == list(LABELS) and ts.n_classes == 3 and ts.text
    assert ts.x_train.shape[1] == 2 and ts.x_train.shape[2] <= 8
    assert ts.x_train[:, 1].sum(1).tolist()[0] == len(tokenizer("if x: pass")["input_ids"])

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "loops"}])
    with pytest.raises(DatasetInvalid, match="'loops' is not a label name"):
        load_text_transfer_set(bad, tokenizer, max_length=8, id2label=id2label)


def test_jsonl_validation_lines(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"text": f"line {i}", "label": i % 3} for i in range(6)]
    rows[1]["split"] = rows[4]["split"] = "val"
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ts = load_text_transfer_set(path, tokenizer, max_length=8, id2label=None, val_fraction=0.5)
    assert len(ts.x_train) == 4 and ts.y_val is not None and ts.y_val.tolist() == [1, 1]


def _hf_info(**hf: Any) -> ModelInfo:
    block = {
        "architecture": "BertForSequenceClassification",
        "model_type": "bert",
        "task": "sequence_classification",
        "num_labels": 3,
        "id2label": {"0": "compound", "1": "expressions", "2": "data"},
        "vocab_size": 800,
        "num_layers": 6,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 4,
        "max_positions": 128,
        **hf,
    }
    ids = {"shape": [None, None], "dtype": "int64"}
    out = {"shape": [None, 3], "dtype": "float32"}
    return ModelInfo(format="hf", inputs=[ids, ids], outputs=[out], trainable=True, hf=block)


def _text_data(**info: Any) -> DatasetInfo:
    base = {"n_samples": 500, "x_shape": [None, 80], "x_dtype": "int64", "has_labels": True}
    return DatasetInfo(**{"text": True, "n_classes": 3, "y_shape": [None], **base, **info})


def test_spec_completed_for_an_hf_teacher() -> None:
    spec = parse_spec({"teacher": {"model_id": "m"}, "dataset_id": "d"})
    done = complete_spec(spec, [_hf_info()], _text_data(class_names=["data", "compound"]))
    assert done.task == "classification" and done.distillation.method == "kd"
    assert done.student is not None and done.student.from_teacher == FromTeacher(layers=2)
    assert done.export == ["hf", "onnx"]

    def refused(spec: dict[str, Any], data: DatasetInfo | None = None) -> InvalidSpec:
        with pytest.raises(InvalidSpec) as err:
            complete_spec(parse_spec(spec), [_hf_info()], data or _text_data())
        return err.value

    base = {"teacher": {"model_id": "m"}, "dataset_id": "d"}
    err = refused(base, _text_data(class_names=["data", "loops"]))
    assert err.field == "dataset_id" and "['loops']" in err.message
    assert refused(base, _text_data(text=False)).field == "dataset_id"
    assert refused({**base, "student": {"preset": "transformer"}}).field == "student.preset"
    assert refused({**base, "export": ["torchscript"]}).field == "export"


# --- students ----------------------------------------------------------------------------------


def test_layer_choice_is_every_kth_layer() -> None:
    assert layer_choice(6, 3) == [1, 3, 5]
    assert layer_choice(6, 2) == [2, 5]
    assert layer_choice(2, 1) == [1]


def _teacher(teacher_zip: Path) -> Any:
    return load_teacher(ModelFile(teacher_zip, "hf"))


def _x(teacher: Any, n: int = 64) -> torch.Tensor:
    return encode(teacher.tokenizer, [t for t, _ in paragraphs()[:n]], 32)


def test_from_teacher_copies_layers_and_keeps_important_channels(teacher_zip: Path) -> None:
    teacher = _teacher(teacher_zip)
    x = _x(teacher)
    spec = StudentSpec(from_teacher=FromTeacher(layers=1))
    student = build_hf_student(spec, teacher, model_file=None, x=x)
    t_state, s_state = teacher.module.model.state_dict(), student.model.state_dict()
    assert student.config.num_hidden_layers == 1
    for key, value in s_state.items():
        source = key.replace("layer.0.", "layer.1.")  # the teacher's last layer
        assert torch.equal(value, t_state[source]), key
    assert student.tokenizer is teacher.tokenizer and student.config.id2label[2] == "data"

    narrow = StudentSpec(from_teacher=FromTeacher(layers=1, hidden_size=32))
    small = build_hf_student(narrow, teacher, model_file=None, x=x)
    assert small.config.hidden_size == 32 and small.config.num_attention_heads == 2
    assert small.config.intermediate_size == 64
    word = small.model.state_dict()["bert.embeddings.word_embeddings.weight"]
    full = t_state["bert.embeddings.word_embeddings.weight"]
    # Each kept column is one of the teacher's columns, unchanged.
    kept = [int((full - word[:, j : j + 1]).abs().sum(0).argmin()) for j in range(32)]
    assert kept == sorted(set(kept)) and len(kept) == 32
    assert torch.equal(full[:, kept], word)


def _kl(teacher: Any, student: HFModel, x: torch.Tensor) -> float:
    with torch.no_grad():
        t, s = teacher.predict(x), student.eval()(x)
    return float(
        torch.nn.functional.kl_div(
            s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"
        )
    )


def test_from_teacher_starts_closer_than_random(tmp_path: Path, tokenizer: Any) -> None:
    # A 4-layer teacher, so that a student with fewer layers still keeps most of its stack
    # (on the 2-layer teacher, 1 copied layer without the first is no closer than random).
    folder = tiny_bert(tmp_path / "deep", tokenizer=tokenizer, layers=4)
    assert train_classifier(folder, epochs=5) > 0.75  # the largest section is 59%
    teacher = _teacher(zip_folder(folder, tmp_path / "deep.zip"))
    x = _x(teacher, 128)

    def kl(init: str, seed: int) -> float:
        torch.manual_seed(seed)
        spec = StudentSpec(from_teacher=FromTeacher(layers=3, init=init))
        return _kl(teacher, build_hf_student(spec, teacher, model_file=None, x=x), x)

    copied = kl("teacher", 0)
    random = sum(kl("random", seed) for seed in range(3)) / 3
    assert copied < random / 2, (copied, random)


# --- losses, by hand ---------------------------------------------------------------------------


def test_hidden_loss_by_hand() -> None:
    h_s = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # (1, 3 tokens, 2)
    h_t = torch.tensor([[[0.0, 2.0], [3.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    # squared errors of the valid tokens: 1 + 0 + 0 + 4 = 5, over 2 tokens × 2 channels
    assert hidden_loss(h_s, h_t, mask).item() == pytest.approx(5 / 4)


def test_attention_kl_by_hand() -> None:
    a_t = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]]]])  # (1 sample, 1 head, 2 queries, 2 keys)
    a_s = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    mask = torch.tensor([[1, 1]])
    q1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    q2 = 1.0 * math.log(1.0 / 0.5)
    assert attention_kl(a_s, a_t, mask).item() == pytest.approx((q1 + q2) / 2, rel=1e-5)
    # the second query padded: only the first counts
    assert attention_kl(a_s, a_t, torch.tensor([[1, 0]])).item() == pytest.approx(q1, rel=1e-5)
    # fewer student heads: both sides averaged over heads first
    two = torch.cat([a_t, a_t], 1)
    assert attention_kl(a_s, two, mask).item() == pytest.approx((q1 + q2) / 2, rel=1e-5)


def test_layer_maps() -> None:
    assert layer_map(None, 2, 6, first=0) == [0, 3, 6]  # embeddings too
    assert layer_map(None, 3, 6, first=1) == [2, 4, 6]  # last to last
    with pytest.raises(InvalidSpec, match="layer_map needs 3"):
        layer_map([0, 7], 2, 6, first=0)


# --- whole jobs --------------------------------------------------------------------------------


def _job(teacher_zip: Path, texts: Path, tmp_path: Path, **spec: Any) -> Any:
    body = {
        "teacher": {"path": "teacher.zip"},
        "dataset_path": "topics.jsonl",
        "training": {"epochs": 3, "batch_size": 32, "max_length": 48, "lr": 2e-3, "device": "cpu"},
        **spec,
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_job(
            parse_spec(body),
            models={"teacher.zip": ModelFile(teacher_zip, "hf")},
            dataset=texts,
            out_dir=tmp_path / "out",
            work_dir=tmp_path / "work",
        )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "hidden", "attention"])
def test_methods_train_a_student_above_chance(
    teacher_zip: Path, texts: Path, tmp_path: Path, method: str
) -> None:
    outcome = _job(
        teacher_zip,
        texts,
        tmp_path,
        student={"from_teacher": {"layers": 1, "init": "random"}},
        distillation={"method": method},
        training={"epochs": 6, "batch_size": 32, "max_length": 48, "lr": 2e-3, "device": "cpu",
                  "baseline": False},
    )  # fmt: skip
    result = outcome.result
    majority = max(sum(1 for _, label in paragraphs() if label == c) for c in LABELS)
    chance = majority / len(paragraphs())
    assert result["student"]["accuracy"] > chance + 0.05, (method, result["student"], chance)
    parts = {k for row in outcome.history for k in row}
    if method != "kd":
        assert f"train_{method}" in parts


def test_default_job_exports_reload_and_reproduce(
    teacher_zip: Path, texts: Path, tmp_path: Path
) -> None:
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    outcome = _job(teacher_zip, texts, tmp_path, training={"epochs": 2, "max_length": 48})
    result = outcome.result
    assert result["student"]["parameters"] < result["teacher"]["parameters"] / 2
    files = {a.kind: a.path for a in outcome.artifacts}
    assert {"student_hf", "student_onnx", "validation_data", "report"} <= set(files)
    val = np.load(files["validation_data"])
    ids, mask, y = val["x_val"][:, 0], val["x_val"][:, 1], val["y_val"]

    folder = tmp_path / "student_hf"
    with zipfile.ZipFile(files["student_hf"]) as zf:
        zf.extractall(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label[2] == "data"
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    accuracy = float((logits.logits.argmax(-1).numpy() == y).mean())
    assert accuracy == pytest.approx(result["student"]["accuracy"], abs=1e-9)

    session = ort.InferenceSession(str(files["student_onnx"]))
    (onnx_logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert float((onnx_logits.argmax(-1) == y).mean()) == pytest.approx(accuracy, abs=1e-9)
    # The tokenizer in the zip is the teacher's: it encodes text to the ids the job used.
    teacher = _teacher(teacher_zip)
    text = "the for statement"
    assert tokenizer(text)["input_ids"] == teacher.tokenizer(text)["input_ids"]


def test_embedder_distils_with_mse_and_cosine(tmp_path: Path, tokenizer: Any) -> None:
    encoder = zip_folder(tiny_bert(tmp_path / "enc", tokenizer=tokenizer, labels=None),
                         tmp_path / "enc.zip")  # fmt: skip
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t, _ in paragraphs()])
    outcome = _job(encoder, texts, tmp_path, training={"epochs": 2, "max_length": 48})
    result = outcome.result
    assert result["task"] == "regression" and result["method"] == "mse"
    assert result["student"]["cosine"] > 0.9 and "mse" in result["student"]
    assert result["export"]["onnx"]["output"] == "embeddings"


def test_dynamic_int8_student_exports(teacher_zip: Path, texts: Path, tmp_path: Path) -> None:
    outcome = _job(
        teacher_zip,
        texts,
        tmp_path,
        training={"epochs": 1, "max_length": 32, "baseline": False},
        compression={"quantize": "dynamic_int8"},
    )
    result = outcome.result
    step = result["compression"][0]
    assert step["step"] == "quantize" and step["after"]["size_bytes"] < step["before"]["size_bytes"]
    assert result["export"]["onnx"]["quantization"] == "dynamic_int8"
    assert result["export"]["hf"]["quantization"] == "dynamic_int8"


def test_distill_run_writes_the_unzipped_folder(
    teacher_zip: Path, texts: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification
    from typer.testing import CliRunner

    from cli.app import app

    spec = {
        "teacher": {"path": str(teacher_zip)},
        "dataset_path": str(texts),
        "training": {"epochs": 1, "max_length": 32, "baseline": False, "device": "cpu"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tmp_path / "spec.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"student_hf.zip", "student.onnx", "report.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(out / "student_hf")
    assert model.config.num_hidden_layers == 1 and model.config.id2label[0] == "compound"


@pytest.mark.slow
def test_a_rerun_resumes_from_the_checkpoints(
    teacher_zip: Path, texts: Path, tmp_path: Path
) -> None:
    spec = parse_spec({
        "teacher": {"path": "teacher.zip"},
        "dataset_path": "topics.jsonl",
        "distillation": {"method": "hidden"},
        "training": {"epochs": 2, "batch_size": 64, "max_length": 32, "device": "cpu"},
    })  # fmt: skip
    runs = []
    for _ in range(2):
        logs: list[str] = []
        outcome = run_job(
            spec,
            models={"teacher.zip": ModelFile(teacher_zip, "hf")},
            dataset=texts,
            out_dir=tmp_path / "out",
            work_dir=tmp_path / "work",
            progress=lambda e, logs=logs: logs.append(e.data.get("message", "")),
        )
        runs.append((outcome.result, logs))
    assert not any("resumed" in m for m in runs[0][1])
    assert any("resumed" in m for m in runs[1][1])
    for key in ("accuracy", "kl_to_teacher"):
        assert runs[1][0]["student"][key] == runs[0][0]["student"][key]


def test_uploaded_hf_student_with_the_teachers_vocabulary(
    teacher_zip: Path, texts: Path, tmp_path: Path, tokenizer: Any
) -> None:
    small = tiny_bert(tmp_path / "small", tokenizer=tokenizer, layers=1, hidden=32, heads=2)
    other = tiny_bert(tmp_path / "other", tokenizer=train_tokenizer(600), layers=1, hidden=32)
    models = {
        "teacher.zip": ModelFile(teacher_zip, "hf"),
        "small.zip": ModelFile(zip_folder(small, tmp_path / "small.zip"), "hf"),
        "other.zip": ModelFile(zip_folder(other, tmp_path / "other.zip"), "hf"),
    }
    body = {
        "teacher": {"path": "teacher.zip"},
        "dataset_path": "topics.jsonl",
        "training": {"epochs": 1, "max_length": 32, "baseline": False, "device": "cpu"},
    }
    outcome = run_job(
        parse_spec({**body, "student": {"path": "small.zip"}}),
        models=models, dataset=texts, out_dir=tmp_path / "out", work_dir=tmp_path / "w1",
    )  # fmt: skip
    assert outcome.result["student"]["parameters"] < outcome.result["teacher"]["parameters"]
    with pytest.raises(InvalidSpec, match="another vocabulary") as err:
        run_job(
            parse_spec({**body, "student": {"path": "other.zip"}}),
            models=models, dataset=texts, out_dir=tmp_path / "out2", work_dir=tmp_path / "w2",
        )  # fmt: skip
    assert err.value.field == "student"


def test_mse_cosine_term_by_hand() -> None:
    from torch import nn

    from core.distill.methods import Batch, build_method

    method = build_method(
        {"method": "mse", "cosine_weight": 2.0},
        student=nn.Identity(),
        teacher=object(),  # type: ignore[arg-type]
        task="regression",
        n_classes=None,
        epochs=1,
    )
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    losses = method.compute(s, {}, Batch(s, None, t))
    # MSE (1 + 1 + 0 + 1) / 4; cosine distances 1 (orthogonal) and 0 (same direction)
    assert losses["mse"].item() == pytest.approx(0.75)
    assert losses["cosine"].item() == pytest.approx(0.5)
    assert losses["loss"].item() == pytest.approx(0.75 + 2 * 0.5)


def test_hf_only_fields_refused_for_other_teachers() -> None:
    onnx = ModelInfo(
        format="onnx",
        inputs=[{"shape": [None, 80], "dtype": "int64"}],
        outputs=[{"shape": [None, 3], "dtype": "float32"}],
    )
    base = {"teacher": {"model_id": "m"}, "dataset_id": "d"}
    cases = [
        ({**base, "student": {"from_teacher": {"layers": 2}}}, "student.from_teacher"),
        ({**base, "student": {"hf_config": {"hidden_size": 64}}}, "student.hf_config"),
        ({**base, "distillation": {"method": "hidden"}}, "distillation.method"),
        ({**base, "export": ["hf"]}, "export"),
    ]
    for body, field in cases:
        with pytest.raises(InvalidSpec) as err:
            complete_spec(parse_spec(body), [onnx], _text_data())
        assert err.value.field == field


def test_gradient_checkpointing_trains_an_encoder_student_alike(
    teacher_zip: Path, texts: Path, tmp_path: Path
) -> None:
    losses = []
    for enabled in (False, True):
        outcome = _job(
            teacher_zip,
            texts,
            tmp_path / str(enabled),
            student={"from_teacher": {"layers": 1}},
            training={"epochs": 1, "batch_size": 32, "max_length": 32, "lr": 2e-3,
                      "device": "cpu", "baseline": False, "gradient_checkpointing": enabled},
            export=["hf"],
        )  # fmt: skip
        losses.append([row["train_loss"] for row in outcome.history if "train_loss" in row])
    assert losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-4)
