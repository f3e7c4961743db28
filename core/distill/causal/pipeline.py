"""A causal-LM job: from the loaded ``hf`` teacher to the measured student and its exports.

The student learns with a method of :mod:`core.distill.methods` (a per-token loss such as
``kd``, ``reverse_kl``, ``jsd``, or one that also maps hidden states) from the teacher's
top-k cache (built once per teacher, dataset, max_length and k; read by later jobs); the
baseline, the same student from the same initial weights, learns the next token alone for the
same steps. Both are measured beside the teacher on the validation text.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from typing import Any

import torch

from core.distill import export
from core.distill.causal import cache as lm_cache
from core.distill.causal import evaluate
from core.distill.causal.data import DEFAULT_MAX_LENGTH, Line, LMData, encode_lines, load_lm_data
from core.distill.causal.export import export_causal_student
from core.distill.causal.generate import OnPolicy, generations_key, teacher_generations
from core.distill.causal.placement import (
    place_teacher,
    teacher_device,
    teacher_identity,
    teacher_logits,
)
from core.distill.causal.quantize import quantize_student
from core.distill.causal.train import train_student
from core.distill.hf.models import HFModel, HFTeacher
from core.distill.hf.students import build_hf_student
from core.distill.methods import build_token_method
from core.distill.stages import model_key
from core.distill.types import Artifact, JobOutcome, ModelFile, StopFn
from core.spec import DatasetInfo, JobSpec, complete_spec, concrete_training


def run_causal(
    spec: JobSpec,
    *,
    teacher: HFTeacher,
    models: dict[str, ModelFile],
    dataset: Path,
    staging: Path,
    work_dir: Path,
    report: Any,
    should_stop: StopFn,
    device: torch.device,
) -> JobOutcome:
    started = time.monotonic()
    training = spec.training
    max_length = _max_length(spec, teacher)
    data = load_lm_data(
        dataset,
        teacher.tokenizer,
        max_length=max_length,
        val_fraction=training.val_fraction,
        seed=training.seed,
    )
    info = DatasetInfo(
        n_samples=len(data.train),
        x_shape=[None, 2, int(data.train.x.shape[-1])],
        x_dtype="int64",
        has_labels=False,
        text=True,
        prompts=data.has_prompts,
    )
    spec = complete_spec(spec, [teacher.info], info)
    # What the spec leaves to the service ("auto") as plain numbers: the recipe's batch size and
    # epochs for this many windows, and its fallback lr (no lr trials for causal LMs yet).
    training = concrete_training(spec.training, len(data.train))
    method = spec.distillation
    assert method is not None and spec.student is not None
    t_device = teacher_device(training, device)
    student = _student(spec, teacher, models, data)  # from the teacher as uploaded
    baseline = copy.deepcopy(student) if training.baseline else None
    tmodel: HFModel = place_teacher(teacher.module, training, t_device)
    if t_device != device or training.teacher_dtype != "fp32":
        report.log(
            f"the teacher runs on {t_device} in {training.teacher_dtype}, the student on {device}"
        )
    # What the teacher's stored outputs (logit cache, generations) are keyed by.
    teacher_file = models[model_key(spec.teacher_refs()[0])].path
    teacher_sha = teacher_identity(_sha256(teacher_file), training)
    train_rows, on_policy, generations = data.train, None, None
    if method.method == "seqkd":
        train_rows, generations = _teacher_rows(
            method, tmodel, data, teacher_sha, work_dir, t_device, spec.training.seed, report
        )
    if method.method == "gkd":
        on_policy = OnPolicy(
            student, data.train_prompts, method.generate, device, data.max_length,
            spec.training.seed,
        )  # fmt: skip
    # seqkd's student learns the teacher's completions by their next tokens alone.
    learner = None
    if method.method != "seqkd":
        learner = build_token_method(method, student=student, teacher=tmodel)
    cache, cache_info = None, None
    if learner is not None and not learner.reads_hidden:
        cache, cache_info = _cache(spec, teacher_sha, tmodel, data, work_dir, t_device, report)

    with_baseline = baseline is not None
    stages = 1 + int(with_baseline)
    report.start("student")
    history = train_student(
        student,
        train_rows,
        data.val,
        training=training,
        method=learner,
        teacher=tmodel,
        cache=cache,
        device=device,
        label="student",
        stage=(1, stages),
        progress=report,
        should_stop=should_stop,
        on_policy=on_policy,
        checkpoint_dir=work_dir,
    )
    report.keep(history)
    if cache_info is not None:
        cache_info["teacher_seconds_in_training"] = history[-1]["teacher_seconds"]
    if baseline is not None:
        report.start("baseline")
        rows = train_student(
            baseline,
            data.train,
            data.val,
            training=training,
            method=None,
            teacher=None,
            cache=None,
            device=device,
            label="baseline",
            stage=(2, stages),
            progress=report,
            should_stop=should_stop,
            checkpoint_dir=work_dir,
        )
        report.keep(rows)

    report.log("measuring the teacher, the student and the baseline on the validation text")
    prompt_ids = _decode_prompt(tmodel, data)
    result: dict[str, Any] = {
        "task": "causal_lm",
        "method": method.method,
        "device": str(device),
        "max_length": data.max_length,
        "teacher": evaluate.report(tmodel, None, data.val, prompt_ids, t_device),
        "student": evaluate.report(student, tmodel, data.val, prompt_ids, device),
    }
    result["teacher"]["size_bytes"] = int(teacher.size_bytes)
    if baseline is not None:
        result["baseline"] = evaluate.report(baseline, tmodel, data.val, prompt_ids, device)
    result["samples"] = evaluate.samples(tmodel, student, data.prompts, device)
    result["stages"] = [
        {
            "stage": 1,
            "student": spec.student.model_dump(exclude_none=True),
            "method": method.method,
            **result["student"],
        }
    ]
    if cache_info is not None:
        result["logit_cache"] = cache_info
    if generations is not None:
        result["generations"] = generations
    trained_perplexity = result["student"]["perplexity"]
    quantized = None
    result["compression"] = []
    if spec.compression.quantize == "dynamic_int8":
        quantized, step = quantize_student(
            student, tmodel, data.val, prompt_ids, result["student"], device, report.log
        )
        result["compression"].append(step)
        result["student"] = step["after"]  # the delivered student, as for other tasks
    artifacts, checks = export_causal_student(
        student,
        list(spec.export),
        data.val,
        trained_perplexity,
        staging,
        report.log,
        quantized=quantized,
    )
    result["export"] = checks
    result["seconds"] = round(time.monotonic() - started, 3)
    report_path = staging / "report.json"
    export.write_report(report_path, result, report.history, spec.model_dump(mode="json"))
    artifacts.append(Artifact("report.json", "report", report_path))
    return JobOutcome(result=result, history=report.history, artifacts=artifacts)


def _max_length(spec: JobSpec, teacher: HFTeacher) -> int:
    training = spec.training
    wanted = training.max_length if "max_length" in training.model_fields_set else None
    limit = teacher.hf.get("max_positions") or DEFAULT_MAX_LENGTH
    return int(wanted or min(DEFAULT_MAX_LENGTH, limit))


def _student(
    spec: JobSpec,
    teacher: HFTeacher,
    models: dict[str, ModelFile],
    data: LMData,
) -> HFModel:
    assert spec.student is not None
    ref = spec.student
    file = models.get(model_key(ref)) if (ref.model_id or ref.path) else None
    student = build_hf_student(ref, teacher, model_file=file, x=data.train.x)
    t_vocab = int(teacher.module.config.vocab_size)
    if int(student.config.vocab_size) != t_vocab:
        # Same vocabulary (checked by its hash), embedding tables padded differently: the rows
        # past the tokenizer's ids are never used, so the student's table takes the teacher's.
        student.model.resize_token_embeddings(t_vocab)
    return student


def _cache(
    spec: JobSpec,
    teacher_sha: str,
    teacher: HFModel,
    data: LMData,
    work_dir: Path,
    device: torch.device,
    report: Any,
) -> tuple[lm_cache.TopKCache | None, dict[str, Any] | None]:
    """The teacher's top-k cache for the training windows: read when another job built it."""
    k = spec.training.logit_cache_k
    if k <= 0:
        return None, None
    key = lm_cache.cache_key(teacher_sha, data.sha256, data.max_length, k)
    folder = lm_cache.cache_root(work_dir / "lm-cache") / key
    cache = lm_cache.open_cache(folder)
    hit = cache is not None
    if cache is None:
        report.log(f"teacher logit cache: computing the teacher's top-{k} for {key}")
        cache = lm_cache.build_cache(
            folder,
            lambda x: teacher_logits(teacher, x, device),
            data.train.x,
            k,
            key=key,
            device=device,
        )
    else:
        report.log(f"teacher logit cache: read {key}; the teacher is not run for training")
    info = {
        "key": key,
        "hit": hit,
        "k": int(cache.meta["k"]),
        "bytes_per_token": round(cache.bytes_per_token, 1),
        "build_seconds": cache.meta["seconds"],
    }
    return cache, info


def _teacher_rows(
    method: Any,
    teacher: HFModel,
    data: LMData,
    teacher_sha: str,
    work_dir: Path,
    device: torch.device,
    seed: int,
    report: Any,
) -> tuple[Any, dict[str, Any]]:
    """``seqkd``: the teacher's completions of the training prompts as the student's rows."""
    gen = method.generate
    key = generations_key(teacher_sha, data.sha256, gen, data.max_length)
    store = lm_cache.cache_root(work_dir / "lm-cache") / key
    prompts, completions, read = teacher_generations(
        teacher, data.train_prompts, gen, device, max_length=data.max_length, store=store, seed=seed
    )
    verb = "read" if read else "wrote"
    report.log(f"seqkd: the teacher {verb} {len(completions)} completions ({key})")
    rows = encode_lines(
        [Line(prompt=p, completion=c) for p, c in zip(prompts, completions, strict=True)],
        teacher.tokenizer,
        data.max_length,
    )
    return rows, {"key": key, "read": read, "completions": len(completions)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_prompt(model: HFModel, data: LMData) -> list[int]:
    tok = model.tokenizer
    text = data.prompts[0] if data.prompts else ""
    ids = list(tok(text, add_special_tokens=False)["input_ids"]) if text else []
    return ids or [int(data.val.x[0, 0, 0])]
