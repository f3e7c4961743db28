"""Causal-LM jobs in the engine: data, students of GPT-2 and Llama teachers, the top-k cache
shared between jobs, evaluation and exports. The teacher is a tiny GPT-2 trained here on
pydoc_data.topics (tests/core/causal_files.py)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from core.distill.causal import cache as lm_cache
from core.distill.causal.data import load_lm_data
from core.distill.hf.models import load_folder
from core.distill.methods import token_kd
from core.distill.methods.token_losses import TeacherTokens
from core.distill.pipeline import run_job
from core.distill.types import Event, ModelFile
from core.errors import InvalidSpec
from core.spec import JobSpec
from tests.core.causal_files import (
    corpus,
    train_teacher,
    train_tokenizer,
    write_text_jsonl,
    zip_folder,
)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models train many times faster on one thread of a busy two-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    root = tmp_path_factory.mktemp("gpt")
    train_teacher(root / "teacher", texts, steps=200)
    return zip_folder(root / "teacher", root / "teacher.zip")


def _lines(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_is_packed_into_windows_and_prompts_mask_their_tokens(
    tmp_path: Path, texts: list[str]
) -> None:
    tok = train_tokenizer(texts[:200], vocab_size=300)
    path = _lines(
        tmp_path / "d.jsonl",
        [{"text": t} for t in texts[:30]]
        + [{"prompt": "Q: what is a tuple?\nA:", "completion": " an immutable sequence"}]
        + [{"text": texts[40], "split": "val"}],
    )
    data = load_lm_data(path, tok, max_length=32, val_fraction=0.1, seed=0)
    x, target = data.train.x, data.train.target
    assert x.shape[1:] == (2, 32)
    windows = x[:, 1].sum(1) == 32
    assert windows.sum() >= 10  # texts joined and cut, not one row per line
    prompt_ids = tok("Q: what is a tuple?\nA:", add_special_tokens=False)["input_ids"]
    row = next(i for i in range(len(x)) if x[i, 0, : len(prompt_ids)].tolist() == prompt_ids)
    assert not target[row, : len(prompt_ids)].any()  # the prompt is never a target
    n = int(x[row, 1].sum())
    assert target[row, len(prompt_ids) : n].all() and not target[row, n:].any()
    assert data.prompts  # the samples' prompts come from the validation text


def test_a_prompt_longer_than_max_length_is_refused(tmp_path: Path, texts: list[str]) -> None:
    tok = train_tokenizer(texts[:200], vocab_size=300)
    path = _lines(
        tmp_path / "d.jsonl",
        [{"prompt": " ".join(texts[:3]), "completion": "x"}, {"text": texts[5], "split": "val"}],
    )
    with pytest.raises(InvalidSpec) as err:
        load_lm_data(path, tok, max_length=16, val_fraction=0.1, seed=0)
    assert err.value.field == "training.max_length"
    tokens = len(tok(" ".join(texts[:3]), add_special_tokens=False)["input_ids"])
    assert err.value.details == {
        "field": "training.max_length", "line": 1, "prompt_tokens": tokens, "max_length": 16
    }  # fmt: skip
    assert str(err.value).startswith(f"line 1: the prompt has {tokens} tokens")


def test_a_prompt_only_line_needs_room_for_one_completion_token(
    tmp_path: Path, texts: list[str]
) -> None:
    tok = train_tokenizer(texts[:200], vocab_size=300)
    prompt = " ".join(texts[:3])
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    rows = [{"text": texts[5], "split": "val"}, {"prompt": prompt}]
    path = _lines(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidSpec, match=f"line 2: the prompt has {n} tokens"):
        load_lm_data(path, tok, max_length=n, val_fraction=0.1, seed=0)
    data = load_lm_data(path, tok, max_length=n + 1, val_fraction=0.1, seed=0)
    row = data.train.x[0]
    assert int(row[1].sum()) == n + 1 and data.train.target[0].sum() == 1  # the end-of-text


def test_llama_student_from_teacher_copies_layers(tmp_path: Path, texts: list[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.distill.hf.models import HFTeacher
    from core.distill.hf.students import build_hf_student
    from core.spec import FromTeacher, ModelInfo, StudentSpec

    tok = train_tokenizer(texts[:200], vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    module = load_folder(tmp_path / "llama")
    assert module.task == "causal_lm"
    info = ModelInfo(format="hf", inputs=[], outputs=[])
    teacher = HFTeacher(module, info, 0)
    x = torch.stack([torch.randint(len(tok), (4, 16)), torch.ones(4, 16, dtype=torch.long)], 1)
    student = build_hf_student(
        StudentSpec(from_teacher=FromTeacher(layers=2)), teacher, model_file=None, x=x
    )
    assert student.config.num_hidden_layers == 2
    t_state, s_state = module.model.state_dict(), student.model.state_dict()
    # every other layer, ending at the last: student layers 0, 1 ← teacher layers 1, 3
    for s_layer, t_layer in ((0, 1), (1, 3)):
        key = "model.layers.{}.self_attn.q_proj.weight"
        assert torch.equal(s_state[key.format(s_layer)], t_state[key.format(t_layer)])
    assert torch.equal(s_state["lm_head.weight"], t_state["lm_head.weight"])
    assert student(x).shape == (4, 16, len(tok))


@pytest.mark.slow
def test_cache_loss_matches_full_logits_on_the_trained_teacher(
    teacher: Path, tmp_path: Path, texts: list[str]
) -> None:
    from core.distill.hf.archive import extract_hf_archive
    from core.distill.hf.models import HFTeacher
    from core.distill.hf.students import build_hf_student
    from core.spec import FromTeacher, ModelInfo, StudentSpec

    model = load_folder(extract_hf_archive(teacher, tmp_path / "t"))
    path = write_text_jsonl(tmp_path / "d.jsonl", texts[:60], 6)
    data = load_lm_data(path, model.tokenizer, max_length=64, val_fraction=0.1, seed=0)
    x = data.train.x[:8]
    cache = lm_cache.build_cache(
        tmp_path / "c" / "key", model, x, 64, key="key", device=torch.device("cpu")
    )
    assert cache.bytes_per_token <= 300  # 64 × (2 + 2) + 4 = 260
    with torch.no_grad():
        full_logits = model(x).float()
        top_mass = full_logits.softmax(-1).topk(64, -1).values.sum(-1).mean()
        # a student as training starts: the teacher's layers 1 and 3 at half the width
        small = StudentSpec(from_teacher=FromTeacher(layers=2, hidden_size=32))
        teacher = HFTeacher(model, ModelInfo(format="hf", inputs=[], outputs=[]), 0)
        student = build_hf_student(small, teacher, model_file=None, x=x)(x).float()
    targets, mask = x[:, 0, 1:], data.train.target[:8, 1:] & x[:, 1, 1:].bool()
    full, _ = token_kd.loss(
        student[:, :-1], TeacherTokens(logits=full_logits).shifted(), targets, mask,
        temperature=1.0, alpha=1.0,
    )  # fmt: skip
    cached, _ = token_kd.loss(
        student[:, :-1], cache.batch(torch.arange(8), torch.device("cpu")).shifted(), targets,
        mask, temperature=1.0, alpha=1.0,
    )  # fmt: skip
    # The tiny teacher is flat (its top 64 of 512 tokens hold ~85% of the mass): the loss over
    # the top 64 and the rest's bucket is a lower bound, within 12% of the full-vocabulary one.
    assert top_mass > 0.8
    assert float(full) * 0.88 <= float(cached) <= float(full) * 1.001


def _job(method: str = "kd", **training: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": {"path": "teacher"},
            "dataset_path": "data.jsonl",
            "student": {"from_teacher": {"layers": 2, "hidden_size": 32}},
            "distillation": {"method": method, "temperature": 1.0, "alpha": 0.5},
            "training": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "max_length": 64, **training},
        }
    )


@pytest.mark.slow
def test_second_job_reads_the_cache_and_exports_reload(
    teacher: Path, tmp_path: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(lm_cache.CACHE_ENV, str(tmp_path / "shared-cache"))
    data = write_text_jsonl(tmp_path / "data.jsonl", texts[:200], 20)
    results = []
    for i in range(2):
        events: list[Event] = []
        outcome = run_job(
            _job(),
            models={"teacher": ModelFile(teacher, "hf")},
            dataset=data,
            out_dir=tmp_path / f"out{i}",
            work_dir=tmp_path / f"work{i}",
            progress=events.append,
        )
        logs = [e.data["message"] for e in events if e.type == "log"]
        results.append((outcome.result, logs))
    (first, first_logs), (second, second_logs) = results
    assert first["logit_cache"]["hit"] is False
    assert any("computing the teacher's top-64" in m for m in first_logs)
    assert second["logit_cache"]["hit"] is True
    assert any("the teacher is not run" in m for m in second_logs)
    assert (
        second["logit_cache"]["teacher_seconds_in_training"]
        < 0.5 * max(first["logit_cache"]["build_seconds"], 0.01) + 0.05
    )
    assert second["logit_cache"]["bytes_per_token"] <= 300
    result = second
    for name in ("teacher", "student", "baseline"):
        assert result[name]["perplexity"] > 1
        assert result[name]["latency_ms_per_token"] > 0 and result[name]["tokens_per_s"] > 0
    assert result["student"]["parameters"] < result["teacher"]["parameters"] / 2
    assert result["samples"] and {"prompt", "teacher", "student"} <= set(result["samples"][0])
    # student_hf loads with AutoModelForCausalLM and reproduces the reported perplexity
    out = tmp_path / "out1"
    with zipfile.ZipFile(out / "student_hf.zip") as zf:
        zf.extractall(tmp_path / "student_hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student_hf")
    assert result["export"]["hf"]["reloaded_perplexity"] == pytest.approx(
        result["student"]["perplexity"], rel=1e-3
    )
    assert model.config.n_layer == 2
    # student.onnx gives the torch logits
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    student = load_folder(tmp_path / "student_hf")
    x = torch.stack([torch.randint(100, (2, 12)), torch.ones(2, 12, dtype=torch.long)], 1)
    (logits,) = session.run(None, {"input_ids": x[:, 0].numpy(), "attention_mask": x[:, 1].numpy()})
    with torch.no_grad():
        assert abs(logits - student(x).numpy()).max() < 1e-3


def _prompt_data(path: Path, texts: list[str]) -> Path:
    rows = []
    for i, text in enumerate(texts[:200]):
        words = text.split()
        rows.append(
            {"prompt": " ".join(words[:6]), "completion": " " + " ".join(words[6:30])}
            | ({"split": "val"} if i % 10 == 0 else {})
        )
    return _lines(path, rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        {"method": "reverse_kl", "temperature": 1.0, "alpha": 0.5},
        {"method": "jsd", "beta": 0.5, "temperature": 1.0, "alpha": 0.5},
        {"method": "seqkd", "generate": {"max_new_tokens": 24, "samples": 2}},
        {"method": "gkd", "lmbda": 0.5, "generate": {"max_new_tokens": 16}},
    ],
    ids=lambda m: m["method"],
)
def test_every_causal_method_runs_and_beats_a_random_student(
    teacher: Path, tmp_path: Path, texts: list[str], method: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv(lm_cache.CACHE_ENV, str(tmp_path / "shared"))
    data = _prompt_data(tmp_path / "pc.jsonl", texts)
    spec = JobSpec.model_validate(
        _job(epochs=4).model_dump(exclude_none=True) | {"distillation": method, "export": ["hf"]}
    )
    runs = []
    for i in range(2 if method["method"] == "seqkd" else 1):
        events: list[Event] = []
        outcome = run_job(
            spec,
            models={"teacher": ModelFile(teacher, "hf")},
            dataset=data,
            out_dir=tmp_path / f"out{i}",
            work_dir=tmp_path / f"work{i}",
            progress=events.append,
        )
        runs.append((outcome.result, [e.data.get("message", "") for e in events]))
    result = runs[-1][0]
    vocab = 512  # a random student's perplexity is about the vocabulary's size
    assert result["student"]["perplexity"] < 0.3 * vocab
    assert result["method"] == method["method"]
    if method["method"] == "seqkd":  # the teacher's generations are stored and read again
        assert runs[0][0]["generations"]["read"] is False
        assert result["generations"]["read"] is True
        assert any("the teacher read" in m for m in runs[1][1])
    if method["method"] == "gkd":
        rows = [r for r in outcome.history if r.get("label") == "student"]
        assert 0 < rows[-1]["on_policy_fraction"] < 1


def test_seqkd_and_gkd_need_prompts() -> None:
    from core.spec import DatasetInfo, ModelInfo, TensorInfo, complete_spec

    hf = {"task": "causal_lm", "num_layers": 4, "hidden_size": 64, "vocab_size": 512}
    info = ModelInfo(
        format="hf", inputs=[], outputs=[TensorInfo(shape=[None, 512], dtype="float32")], hf=hf
    )
    text = DatasetInfo(n_samples=100, x_shape=[None, 2, 64], x_dtype="int64", has_labels=False,
                       text=True)  # fmt: skip
    for name in ("seqkd", "gkd"):
        spec = JobSpec.model_validate(
            {"teacher": {"model_id": "m"}, "dataset_id": "d", "distillation": {"method": name}}
        )
        with pytest.raises(InvalidSpec) as err:
            complete_spec(spec, [info], text)
        assert err.value.field == "dataset_id" and "prompt" in str(err.value)
        assert complete_spec(spec, [info], text.model_copy(update={"prompts": True})).task == (
            "causal_lm"
        )


@pytest.mark.slow
def test_uploaded_student_with_padded_vocabulary_is_aligned_another_is_refused(
    teacher: Path, tmp_path: Path, texts: list[str]
) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from core.distill.hf.archive import extract_hf_archive

    folder = extract_hf_archive(teacher, tmp_path / "t")
    tok = AutoTokenizer.from_pretrained(folder)

    def student_zip(name: str, tokenizer: Any, vocab: int) -> Path:
        config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=1, n_head=2,
                            pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        GPT2LMHeadModel(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return zip_folder(tmp_path / name, tmp_path / f"{name}.zip")

    padded = student_zip("padded", tok, len(tok) + 64)  # rows padded to a multiple of 64
    other_tok = train_tokenizer(texts[:100], vocab_size=400)
    other = student_zip("other", other_tok, len(other_tok))
    data = write_text_jsonl(tmp_path / "data.jsonl", texts[:80], 8)
    spec = _job(epochs=1).model_dump(exclude_none=True)
    spec["student"] = {"path": "student"}
    spec["export"] = ["hf"]
    outcome = run_job(
        JobSpec.model_validate(spec),
        models={"teacher": ModelFile(teacher, "hf"), "student": ModelFile(padded, "hf")},
        dataset=data,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
    )
    assert outcome.result["student"]["perplexity"] < len(tok)  # it learned (random: ~576)
    with zipfile.ZipFile(tmp_path / "out" / "student_hf.zip") as zf:
        assert json.loads(zf.read("config.json"))["vocab_size"] == len(tok)  # the padding cut
    with pytest.raises(InvalidSpec) as err:
        run_job(
            JobSpec.model_validate(spec),
            models={"teacher": ModelFile(teacher, "hf"), "student": ModelFile(other, "hf")},
            dataset=data,
            out_dir=tmp_path / "out2",
            work_dir=tmp_path / "work2",
        )
    assert err.value.field == "student"
