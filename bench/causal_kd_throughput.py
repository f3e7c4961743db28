"""Token-level KD throughput for a small GPT pair: a hand-written loop and TRL's GKD trainer vs
the engine with its top-k logit cache.

Teacher: a GPT-2 of 6 layers, width 256, with a byte-level BPE tokenizer of ``--vocab`` tokens
trained on ``pydoc_data.topics`` (random weights: speed does not depend on them). Student: the
teacher made smaller, ``{"from_teacher": {"layers": 3, "hidden_size": 128}}``. Data: the
topics' paragraphs packed into ``--length``-token windows.

Three arms train the same student weights on the same windows in the same order, one epoch,
AdamW at a constant learning rate, no clipping, the loss ``α·T²·KL(p_T ‖ q_T) + (1 − α)·CE``
(``--alpha``, default 1: forward KL alone, which is what TRL's GKD computes at λ = 0, β = 0):

- hand-written: what one writes with ``transformers`` and PyTorch; on every step the frozen
  teacher runs forward on the batch and the KL runs over the full vocabulary;
- TRL: ``GKDTrainer`` with λ = 0, β = 0 (``bench/trl_gkd.py``), teacher forward on every step,
  full-vocabulary KL; skipped with a message when TRL is not installed (``--no-trl`` skips it);
- engine: ``kd`` reading the teacher's top-64 from the memory-mapped cache (its build, the
  teacher's one pass, timed apart and included in a second figure).

A fourth figure is the floor under any of them: the engine training the student on the next
token alone (cross-entropy, no teacher), the student's own forward, backward and AdamW step.

Timed: the training steps. The hand-written loop and the engine are timed from before the first
step to after the last (the engine's figure includes its optimizer set-up and a one-window
validation); TRL from its ``on_train_begin`` callback to the last ``on_step_end``, so its
trainer construction, dataset wrapping and accelerate set-up are left out. The arms alternate,
``--rounds`` times after one untimed run of each, and the medians are reported in tokens per
second.

    python -m bench.causal_kd_throughput                 # CPU, about 3 minutes
    python -m bench.causal_kd_throughput --device cuda --length 256 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--windows", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the KL against CE")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's GKD trainer out")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench import trl_gkd
    from core.distill.causal import cache as lm_cache
    from core.distill.causal.data import TokenRows
    from core.distill.causal.train import train_student
    from core.distill.hf.models import HFModel, HFTeacher
    from core.distill.hf.students import build_hf_student
    from core.spec import FromTeacher, KDMethod, ModelInfo, StudentSpec, TrainingSpec
    from tests.core.causal_files import corpus, train_tokenizer, windows

    trl_missing = "left out (--no-trl)" if args.no_trl else trl_gkd.available()
    if trl_missing:
        print(f"TRL arm skipped: {trl_missing}", file=sys.stderr)

    texts = corpus()
    tok = train_tokenizer(texts, vocab_size=args.vocab)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=args.length, n_embd=256, n_layer=6,
                        n_head=8, pad_token_id=tok.pad_token_id)  # fmt: skip
    teacher = HFModel(GPT2LMHeadModel(config).eval(), "causal_lm", tok).to(device)
    ids = windows(tok, texts * 4, args.length)[: args.windows]
    x = torch.stack([ids, torch.ones_like(ids)], 1)
    rows = TokenRows(x, torch.ones_like(ids, dtype=torch.bool))
    info = ModelInfo(format="hf", inputs=[], outputs=[])
    small = StudentSpec(from_teacher=FromTeacher(layers=3, hidden_size=128))
    start = build_hf_student(small, HFTeacher(teacher.cpu(), info, 0), model_file=None, x=x)
    teacher.to(device)
    training = TrainingSpec(epochs=1, batch_size=args.batch, lr=1e-3, weight_decay=0.0, seed=0)
    method = KDMethod(temperature=1.0, alpha=args.alpha)
    tokens = int(x.shape[0] * (x.shape[2] - 1))
    # the engine's shuffle; the other arms take the windows in this order too
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(training.seed))

    def hand_written() -> float:
        student = copy.deepcopy(start).to(device).train()
        opt = torch.optim.AdamW(student.model.parameters(), lr=training.lr, weight_decay=0.0)
        _sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(x), args.batch):
            b = ids[order[s : s + args.batch]].to(device)
            with _autocast(device):
                with torch.no_grad():
                    t_logits = teacher.model(input_ids=b).logits[:, :-1].float()
                s_logits = student.model(input_ids=b).logits[:, :-1].float()
            kl = F.kl_div(
                F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1),
                log_target=True, reduction="none",
            ).sum(-1).mean()  # fmt: skip
            loss = args.alpha * kl
            if args.alpha < 1:
                ce = F.cross_entropy(s_logits.flatten(0, 1), b[:, 1:].flatten())
                loss = loss + (1 - args.alpha) * ce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        return tokens / (time.perf_counter() - t0)

    def engine(cache: lm_cache.TopKCache | None, distil: bool = True) -> float:
        student = copy.deepcopy(start)
        _sync(device)
        t0 = time.perf_counter()
        train_student(student, rows, TokenRows(x[:1], rows.target[:1]), training=training,
                      method=method if distil else None, teacher=teacher, cache=cache,
                      device=device, label="s", stage=(1, 1), progress=lambda e: None,
                      should_stop=lambda: False)  # fmt: skip
        _sync(device)
        return tokens / (time.perf_counter() - t0)

    def trl() -> float:
        student = copy.deepcopy(start).model.to(device).train()
        seconds = trl_gkd.train_seconds(
            student, teacher.model, tok, ids[order], batch=args.batch, lr=training.lr,
            weight_decay=0.0, seed=training.seed, device=device,
        )  # fmt: skip
        return tokens / seconds

    folder = Path(tempfile.mkdtemp()) / "cache"
    t0 = time.perf_counter()
    cache = lm_cache.build_cache(folder, teacher, x, 64, key="bench", device=device)
    build = time.perf_counter() - t0
    arms: dict[str, Callable[[], float]] = {
        "engine_cached": lambda: engine(cache),
        "hand_written": hand_written,
        "engine_ce_only": lambda: engine(None, distil=False),
    }
    if not trl_missing:
        arms["trl_gkd"] = trl
    for arm in arms.values():  # untimed: first calls pay for lazy imports and allocations
        arm()
    runs: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            runs[name].append(arm())
    tps = {name: statistics.median(v) for name, v in runs.items()}
    ours = tps["engine_cached"]
    with_build = tokens / (tokens / ours + build)
    figures: dict[str, Any] = {
        "device": str(device), "vocab": len(tok), "length": args.length, "batch": args.batch,
        "alpha": args.alpha, "tokens_per_epoch": tokens,
        "cache_bytes_per_token": round(cache.bytes_per_token, 1),
        "cache_build_s": round(build, 3),
        **{f"{name}_tokens_per_s": round(v) for name, v in tps.items()},
        "engine_cached_with_one_build_tokens_per_s": round(with_build),
        "ratio": round(ours / tps["hand_written"], 2),
        "ratio_with_build": round(with_build / tps["hand_written"], 2),
        "versions": trl_gkd.versions(),
        "rounds": {name: [round(v) for v in vs] for name, vs in runs.items()},
    }  # fmt: skip
    if "trl_gkd" in tps:
        figures["ratio_to_trl"] = round(ours / tps["trl_gkd"], 2)
        figures["ratio_to_trl_with_build"] = round(with_build / tps["trl_gkd"], 2)
        figures["target_1_5x_trl_met"] = ours / tps["trl_gkd"] >= 1.5
    else:
        figures["trl_gkd"] = f"skipped: {trl_missing}"
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on GPUs that support it, as the engine and TRL's ``bf16=True`` run."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
