"""Causal-LM students: dynamic int8 quantization measured before and after, gradient
checkpointing, and the teacher on its own device and dtype."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.distill.causal.data import TokenRows
from core.distill.hf.models import HFModel
from core.distill.pipeline import run_job
from core.distill.types import ModelFile
from core.errors import InvalidSpec
from core.spec import parse_spec
from tests.core.causal_files import corpus, train_teacher, write_text_jsonl, zip_folder


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


def _job(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "teacher": {"path": "teacher"},
        "dataset_path": "data.jsonl",
        "student": {"from_teacher": {"layers": 2, "hidden_size": 32}},
        "distillation": {"method": "kd", "temperature": 1.0, "alpha": 0.5},
        "training": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "max_length": 64},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def _tiny(family: str, vocab: int = 128) -> HFModel:
    """A random tiny causal LM of ``family`` (GPT-2's head tied to its embeddings)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        config: Any = tf.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2,
                                    n_head=4, pad_token_id=0)  # fmt: skip
        model: Any = tf.GPT2LMHeadModel(config)
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]  # fmt: skip
        config = cls[0](vocab_size=vocab, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=32, pad_token_id=0,
                        tie_word_embeddings=False)  # fmt: skip
        model = cls[1](config)
    return HFModel(model.eval(), "causal_lm")


def _rows(n: int = 4, length: int = 16, vocab: int = 128) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (n, length), generator=gen)
    return torch.stack([ids, torch.ones_like(ids)], 1)


# --- dynamic int8 ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_dynamic_int8_covers_every_linear_layer_of_the_common_families(family: str) -> None:
    import torch.ao.nn.quantized.dynamic as nnqd
    from transformers.pytorch_utils import Conv1D

    from core.distill.compress import quantize, quantized_parameters

    model = _tiny(family)
    x = _rows()
    quantized = quantize(model, "dynamic_int8", calibration=x)
    float_layers = [
        name
        for name, m in quantized.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and not isinstance(m, nnqd.Linear)
    ]
    # GPT-2's head is its embedding table (tied): it stays float, every other layer is int8
    assert float_layers == (["model.lm_head"] if family == "gpt2" else [])
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".h." in n or ".layers." in n)
    assert quantized_parameters(quantized) >= 0.9 * blocks - 2000  # norms and biases stay float
    with torch.no_grad():
        before, after = model(x), quantized(x)
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert all(isinstance(m, Conv1D) is False for m in quantized.modules())
    assert any(isinstance(m, Conv1D) for m in model.modules()) == (family == "gpt2")  # untouched


def test_dynamic_int8_refuses_a_model_without_linear_layers() -> None:
    from core.distill.compress import quantize
    from core.errors import CompressionFailed

    with pytest.raises(CompressionFailed, match="Linear"):
        quantize(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), "dynamic_int8")


@pytest.mark.slow
def test_quantized_student_is_reported_beside_the_float_one(
    teacher: Path, tmp_path: Path, texts: list[str]
) -> None:
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    data = write_text_jsonl(tmp_path / "data.jsonl", texts[:150], 20)
    spec = _job(
        compression={"quantize": "dynamic_int8"},
        training={"baseline": False, "teacher_device": "cpu"},
    )
    outcome = run_job(
        parse_spec(spec),
        models={"teacher": ModelFile(teacher, "hf")},
        dataset=data,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
    )
    result = outcome.result
    (step,) = result["compression"]
    before, after = step["before"], step["after"]
    assert step["mode"] == "dynamic_int8" and step["quantized_share"] > 0.4
    assert result["student"] == after  # the delivered student is the int8 one
    assert result["stages"][0]["perplexity"] == before["perplexity"]
    for figures in (before, after):
        assert {"perplexity", "token_agreement", "kl_to_teacher", "size_bytes",
                "latency_ms_per_token", "tokens_per_s"} <= set(figures)  # fmt: skip
    # A broken int8 layer (a weight not transposed, a wrong scale) multiplies the perplexity;
    # int8 rounding moves it by a few percent at most.
    assert math.isfinite(after["perplexity"])
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=0.1)
    assert after["token_agreement"] > 0.8 * before["token_agreement"]
    assert after["size_bytes"] < 0.75 * before["size_bytes"]
    assert after["parameters"] == before["parameters"]
    # student_hf is the float student: it reloads with the trained student's perplexity
    assert result["export"]["hf"]["quantization"] == "none"
    assert result["export"]["hf"]["reloaded_perplexity"] == pytest.approx(
        before["perplexity"], rel=1e-3
    )
    with zipfile.ZipFile(tmp_path / "out" / "student_hf.zip") as zf:
        zf.extractall(tmp_path / "student_hf")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student_hf").config.n_layer == 2
    # student.onnx is the int8 student
    assert result["export"]["onnx"]["quantization"] == "dynamic_int8"
    session = ort.InferenceSession(
        str(tmp_path / "out" / "student.onnx"), providers=["CPUExecutionProvider"]
    )
    assert any("Integer" in n.op_type or "Quant" in n.op_type for n in _onnx_nodes(session))


def _onnx_nodes(session: Any) -> list[Any]:
    import onnx

    return list(onnx.load(session._model_path).graph.node)


def test_causal_students_refuse_other_compression() -> None:
    from core.spec import DatasetInfo, ModelInfo, TensorInfo, complete_spec

    hf = {"task": "causal_lm", "num_layers": 4, "hidden_size": 64, "vocab_size": 512}
    info = ModelInfo(
        format="hf", inputs=[], outputs=[TensorInfo(shape=[None, 512], dtype="float32")], hf=hf
    )
    text = DatasetInfo(n_samples=100, x_shape=[None, 2, 64], x_dtype="int64",
                       has_labels=False, text=True)  # fmt: skip
    for compression, field in (
        ({"quantize": "fp16"}, "compression.quantize"),
        ({"prune": {"amount": 0.5}}, "compression.prune"),
    ):
        spec = parse_spec(_job(compression=compression))
        with pytest.raises(InvalidSpec) as err:
            complete_spec(spec, [info], text)
        assert err.value.field == field
    assert complete_spec(parse_spec(_job(compression={"quantize": "dynamic_int8"})), [info], text)


# --- gradient checkpointing --------------------------------------------------------------------


def _loss_and_grads(model: HFModel, x: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks
    logits = model(x)[:, :-1]
    loss = nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 0, 1:])
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _block_calls(model: HFModel) -> list[int]:
    calls = [0]
    # A layer inside the block: the checkpointed block calls it again in the backward pass.
    layer = model.model.transformer.h[0].attn.c_attn
    layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    from core.distill.hf.checkpointing import checkpointing, is_checkpointing

    model = _tiny("gpt2").train()  # dropout on: checkpointing must replay its random state
    x = _rows()
    loss, grads = _loss_and_grads(model, x)
    calls = _block_calls(model)
    with checkpointing(model, True):
        assert is_checkpointing(model) and model.config.use_cache is False
        ck_loss, ck_grads = _loss_and_grads(model, x)
    assert calls[0] == 2  # the block ran again in the backward pass: checkpointing is on
    assert ck_loss == pytest.approx(loss, rel=1e-6)
    assert len(ck_grads) == len(grads)
    for a, b in zip(grads, ck_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not is_checkpointing(model) and model.config.use_cache is True


def test_training_applies_gradient_checkpointing_when_asked() -> None:
    from core.distill.causal.train import train_student
    from core.distill.hf.checkpointing import is_checkpointing
    from core.spec import TrainingSpec

    x = _rows(n=8)
    rows = TokenRows(x=x, target=torch.ones(8, 16, dtype=torch.bool))
    for enabled, per_step in ((False, 1), (True, 2)):
        model = _tiny("gpt2")
        calls = _block_calls(model)
        training = TrainingSpec(epochs=1, batch_size=8, lr=1e-3, gradient_checkpointing=enabled)
        train_student(
            model, rows, rows, training=training, method=None, teacher=None, cache=None,
            device=torch.device("cpu"), label="student", stage=(1, 1),
            progress=lambda _e: None, should_stop=lambda: False,
        )  # fmt: skip
        validation = (8 + 7) // 8  # the epoch's validation perplexity runs the block once more
        assert calls[0] == per_step + validation
        assert not is_checkpointing(model)


def test_gradient_checkpointing_is_refused_for_other_students() -> None:
    from core.spec import DatasetInfo, ModelInfo, TensorInfo, complete_spec

    info = ModelInfo(format="torchscript", inputs=[TensorInfo(shape=[None, 4], dtype="float32")],
                     outputs=[TensorInfo(shape=[None, 3], dtype="float32")])  # fmt: skip
    data = DatasetInfo(n_samples=100, x_shape=[None, 4], x_dtype="float32", has_labels=True,
                       n_classes=3)  # fmt: skip
    spec = parse_spec({"teacher": {"model_id": "m"}, "dataset_id": "d",
                       "training": {"gradient_checkpointing": True}})  # fmt: skip
    with pytest.raises(InvalidSpec) as err:
        complete_spec(spec, [info], data)
    assert err.value.field == "training.gradient_checkpointing"
    for training in ({"teacher_device": "cpu"}, {"teacher_dtype": "bf16"}):
        spec = parse_spec({"teacher": {"model_id": "m"}, "dataset_id": "d", "training": training})
        with pytest.raises(InvalidSpec) as err:
            complete_spec(spec, [info], data)
        assert err.value.field == f"training.{next(iter(training))}"


# --- the teacher's device and dtype ------------------------------------------------------------


def test_teacher_device_values_are_checked() -> None:
    from core.distill.causal.placement import teacher_device
    from core.spec import TrainingSpec

    with pytest.raises(InvalidSpec) as err:
        parse_spec(_job(training={"teacher_device": "gpu0"}))
    assert err.value.field == "training.teacher_device"
    cpu = torch.device("cpu")
    assert teacher_device(TrainingSpec(teacher_device="cpu"), cpu) == cpu
    assert teacher_device(TrainingSpec(), torch.device("meta")) == torch.device("meta")
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(InvalidSpec) as err:
        teacher_device(TrainingSpec(teacher_device=missing), cpu)
    assert err.value.field == "training.teacher_device" and missing in str(err.value)
    with pytest.raises(InvalidSpec) as err:
        teacher_device(TrainingSpec(teacher_device="cpu", teacher_dtype="fp16"), cpu)
    assert err.value.field == "training.teacher_dtype"


def test_a_job_with_a_missing_teacher_gpu_fails_naming_the_field(
    tmp_path: Path, texts: list[str]
) -> None:
    data = write_text_jsonl(tmp_path / "data.jsonl", texts[:20], 4)
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    with pytest.raises(InvalidSpec) as err:
        run_job(
            parse_spec(_job(training={"teacher_device": missing})),
            models={"teacher": ModelFile(tmp_path / "absent.zip", "hf")},
            dataset=data,
            out_dir=tmp_path / "out",
            work_dir=tmp_path / "work",
        )
    assert err.value.field == "training.teacher_device"


def test_a_bf16_teacher_gives_float32_logits_on_the_students_device_and_its_own_cache_key() -> None:
    from core.distill.causal.placement import place_teacher, teacher_identity, teacher_logits
    from core.spec import TrainingSpec

    x = _rows()
    model = _tiny("llama")
    with torch.no_grad():
        reference = model(x)
    bf16 = TrainingSpec(teacher_device="cpu", teacher_dtype="bf16")
    placed = place_teacher(model, bf16, torch.device("cpu"))
    assert next(placed.parameters()).dtype == torch.bfloat16
    logits = teacher_logits(placed, x, torch.device("cpu"))
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    sha = "ab" * 32
    assert teacher_identity(sha, TrainingSpec()) == sha  # the float32 caches keep their keys
    assert teacher_identity(sha, bf16) != sha


@pytest.mark.slow
def test_a_job_runs_its_bf16_teacher_on_the_cpu_every_batch(
    teacher: Path, tmp_path: Path, texts: list[str]
) -> None:
    from core.distill.types import Event

    data = write_text_jsonl(tmp_path / "data.jsonl", texts[:150], 20)
    events: list[Event] = []
    training = {"baseline": False, "teacher_device": "cpu", "teacher_dtype": "bf16",
                "logit_cache_k": 0, "gradient_checkpointing": True}  # fmt: skip
    outcome = run_job(
        parse_spec(_job(training=training, export=["hf"])),
        models={"teacher": ModelFile(teacher, "hf")},
        dataset=data,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        progress=events.append,
    )
    logs = [e.data.get("message", "") for e in events if e.type == "log"]
    assert any("the teacher runs on cpu in bf16" in m for m in logs)
    result = outcome.result
    vocab = 512  # a random student's perplexity is about the vocabulary's size
    assert result["student"]["perplexity"] < 0.3 * vocab
    assert 1 < result["teacher"]["perplexity"] < result["student"]["perplexity"]
    assert result["student"]["token_agreement"] > 0.2
