"""Token-level KD throughput for a small GPT pair: a hand-written loop vs the engine with its
top-k logit cache.

Teacher: a GPT-2 of 6 layers, width 256, with a byte-level BPE tokenizer of ``--vocab`` tokens
trained on ``pydoc_data.topics`` (random weights: speed does not depend on them). Student: the
teacher made smaller, ``{"from_teacher": {"layers": 3, "hidden_size": 128}}``. Data: the
topics' paragraphs packed into ``--length``-token windows.

The hand-written loop is what one writes with ``transformers`` and PyTorch: on every step the
frozen teacher runs forward on the batch and the student minimises
``α·T²·KL(p_T ‖ q_T) + (1 − α)·CE`` over the full vocabulary. The engine's ``kd`` reads the
teacher's top-64 from the memory-mapped cache (its build, the teacher's one pass, timed apart
and included in the second figure). Same student weights, data, optimizer, batches, epochs; the
runs alternate, ``--rounds`` times, and the medians are reported in tokens per second.

    python -m bench.causal_kd_throughput                 # CPU, about 2 minutes
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
from pathlib import Path

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
    args = parser.parse_args()
    device = torch.device(args.device)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import GPT2Config, GPT2LMHeadModel

    from core.distill.causal import cache as lm_cache
    from core.distill.causal.data import TokenRows
    from core.distill.causal.train import train_student
    from core.distill.hf.models import HFModel, HFTeacher
    from core.distill.hf.students import build_hf_student
    from core.spec import FromTeacher, KDMethod, ModelInfo, StudentSpec, TrainingSpec
    from tests.core.causal_files import corpus, train_tokenizer, windows

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
    training = TrainingSpec(epochs=1, batch_size=args.batch, lr=1e-3, weight_decay=0.0)
    method = KDMethod(temperature=1.0, alpha=0.5)
    tokens = int(x.shape[0] * (x.shape[2] - 1))

    def hand_written() -> float:
        student = copy.deepcopy(start).to(device).train()
        opt = torch.optim.AdamW(student.model.parameters(), lr=1e-3, weight_decay=0.0)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        for s in range(0, len(x), args.batch):
            b = ids[order[s : s + args.batch]].to(device)
            with torch.no_grad():
                t_logits = teacher.model(input_ids=b).logits[:, :-1]
            s_logits = student.model(input_ids=b).logits[:, :-1]
            kl = F.kl_div(
                F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1),
                log_target=True, reduction="none",
            ).sum(-1).mean()  # fmt: skip
            ce = F.cross_entropy(s_logits.flatten(0, 1), b[:, 1:].flatten())
            loss = 0.5 * kl + 0.5 * ce
            opt.zero_grad()
            loss.backward()
            opt.step()
        _sync(device)
        return tokens / (time.perf_counter() - t0)

    def engine(cache: lm_cache.TopKCache) -> float:
        student = copy.deepcopy(start)
        t0 = time.perf_counter()
        train_student(student, rows, TokenRows(x[:1], rows.target[:1]), training=training,
                      method=method, teacher=teacher, cache=cache, device=device, label="s",
                      stage=(1, 1), progress=lambda e: None, should_stop=lambda: False)  # fmt: skip
        _sync(device)
        return tokens / (time.perf_counter() - t0)

    folder = Path(tempfile.mkdtemp()) / "cache"
    t0 = time.perf_counter()
    cache = lm_cache.build_cache(folder, teacher, x, 64, key="bench", device=device)
    build = time.perf_counter() - t0
    hand, ours = [], []
    for _ in range(args.rounds):
        hand.append(hand_written())
        ours.append(engine(cache))
    hand_tps, ours_tps = statistics.median(hand), statistics.median(ours)
    with_build = tokens / (tokens / ours_tps + build)
    print(json.dumps({
        "device": str(device), "vocab": len(tok), "length": args.length, "batch": args.batch,
        "tokens_per_epoch": tokens, "cache_bytes_per_token": round(cache.bytes_per_token, 1),
        "cache_build_s": round(build, 3),
        "hand_written_tokens_per_s": round(hand_tps), "engine_cached_tokens_per_s": round(ours_tps),
        "engine_cached_with_one_build_tokens_per_s": round(with_build),
        "ratio": round(ours_tps / hand_tps, 2), "ratio_with_build": round(with_build / hand_tps, 2),
        "rounds": {"hand_written": [round(v) for v in hand], "engine": [round(v) for v in ours]},
    }, indent=1))  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
