"""``hidden`` for causal LMs: per-token KD plus mapped hidden states through learned maps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.distill.causal import cache as lm_cache
from core.distill.hf.models import HFModel
from core.distill.methods import build_token_method
from core.distill.methods.token_losses import TeacherTokens, TokenBatch
from core.distill.pipeline import run_job
from core.distill.types import Event, ModelFile
from core.errors import InvalidSpec
from core.spec import DatasetInfo, JobSpec, ModelInfo, TensorInfo, complete_spec
from tests.core.causal_files import write_text_jsonl
from tests.core.test_causal import one_thread, teacher, texts  # noqa: F401 - fixtures


def gpt(layers: int, width: int) -> HFModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return HFModel(GPT2LMHeadModel(config).eval(), "causal_lm")


def batch_of(student: HFModel, tutor: HFModel, x: torch.Tensor) -> TokenBatch:
    logits, hidden = student.run(x, hidden=True)
    t_logits, t_hidden = tutor.run(x, hidden=True)
    targets, mask = x[:, 0, 1:], x[:, 1, 1:].bool()
    tokens = TeacherTokens(logits=t_logits).shifted()
    return TokenBatch(x, logits[:, :-1], targets, mask, tokens, hidden, t_hidden)


def test_default_map_is_uniform_and_a_student_matching_its_teacher_has_no_hidden_loss() -> None:
    student, tutor = gpt(2, 32), gpt(4, 32)
    method = build_token_method({"method": "hidden"}, student=student, teacher=tutor)
    assert method.reads_hidden and method.map == [0, 2, 4]
    assert len(list(method.parameters())) == 6  # a weight and a bias per mapped layer
    x = torch.stack([torch.randint(64, (3, 10)), torch.ones(3, 10, dtype=torch.long)], 1)
    with torch.no_grad():
        same = build_token_method({"method": "hidden"}, student=student, teacher=student)
        _, parts = same(batch_of(student, student, x))  # identity maps at start: equal states
        assert float(parts["hidden"]) == pytest.approx(0.0, abs=1e-10)
        loss, parts = method(batch_of(student, tutor, x))
    assert float(parts["hidden"]) > 0
    assert float(loss) == pytest.approx(
        0.9 * 16 * float(parts["kl"]) + 0.1 * float(parts["ce"]) + float(parts["hidden"]), rel=1e-4
    )


def test_layer_map_out_of_range_or_of_the_wrong_length_is_refused_naming_the_field() -> None:
    hf = {"task": "causal_lm", "num_layers": 4, "hidden_size": 64, "vocab_size": 512}
    info = ModelInfo(
        format="hf", inputs=[], outputs=[TensorInfo(shape=[None, 512], dtype="float32")], hf=hf
    )
    text = DatasetInfo(n_samples=100, x_shape=[None, 2, 64], x_dtype="int64", has_labels=False,
                       text=True)  # fmt: skip

    def spec(layer_map: list[int]) -> JobSpec:
        return JobSpec.model_validate(
            {
                "teacher": {"model_id": "m"},
                "dataset_id": "d",
                "student": {"from_teacher": {"layers": 2}},
                "distillation": {"method": "hidden", "layer_map": layer_map},
            }
        )

    assert complete_spec(spec([0, 2, 4]), [info], text).task == "causal_lm"
    with pytest.raises(InvalidSpec, match=r"teacher layers \[7\].*0\.\.4") as err:
        complete_spec(spec([0, 2, 7]), [info], text)
    assert err.value.field == "distillation.layer_map"
    with pytest.raises(InvalidSpec, match="needs 3 teacher layers") as err:
        build_token_method(
            {"method": "hidden", "layer_map": [0, 4]}, student=gpt(2, 32), teacher=gpt(4, 32)
        )
    assert err.value.field == "distillation.layer_map"


@pytest.mark.slow
def test_hidden_trains_a_gpt2_student_end_to_end_and_its_hidden_loss_falls(
    teacher: Path,  # noqa: F811 - the fixture of test_causal
    tmp_path: Path,
    texts: list[str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(lm_cache.CACHE_ENV, str(tmp_path / "shared"))
    data = write_text_jsonl(tmp_path / "data.jsonl", texts[:200], 20)
    spec: dict[str, Any] = {
        "teacher": {"path": "teacher"},
        "dataset_path": "data.jsonl",
        "student": {"from_teacher": {"layers": 2, "hidden_size": 32}},
        "distillation": {"method": "hidden", "temperature": 1.0, "alpha": 0.5},
        "training": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "max_length": 64},
        "export": ["hf"],
    }
    events: list[Event] = []
    outcome = run_job(
        JobSpec.model_validate(spec),
        models={"teacher": ModelFile(teacher, "hf")},
        dataset=data,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        progress=events.append,
    )
    result = outcome.result
    assert result["method"] == "hidden"
    assert "logit_cache" not in result  # the teacher ran on every batch for its hidden states
    rows = [r for r in outcome.history if r.get("label") == "student"]
    assert len(rows) == 3
    assert rows[-1]["hidden"] < 0.8 * rows[0]["hidden"]
    assert result["student"]["perplexity"] < 0.3 * 512  # a random student: about the vocabulary
