"""The TRL arm of bench/causal_kd_throughput trains as the other arms do: the same steps on the
same windows, forward KL, AdamW at a constant rate, no clipping, no weight decay."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bench import trl_gkd

pytestmark = pytest.mark.skipif(trl_gkd.available() is not None, reason="TRL is not installed")


def _pair() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.core.causal_files import corpus, train_tokenizer

    tok = train_tokenizer(corpus()[:200], vocab_size=300)
    torch.manual_seed(0)

    def gpt(width: int, init: float) -> torch.nn.Module:
        config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=width, n_layer=1,
                            n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            initializer_range=init, pad_token_id=tok.pad_token_id)  # fmt: skip
        return GPT2LMHeadModel(config)

    # a peaked teacher: a divergence, and gradients, well above float noise
    return gpt(32, 0.5).eval(), gpt(16, 0.02), tok


def test_trl_arm_takes_the_hand_written_steps() -> None:
    teacher, student, tok = _pair()
    ids = torch.randint(0, len(tok), (6, 16), generator=torch.Generator().manual_seed(1))
    ours = copy.deepcopy(student).train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.0)
    for s in range(0, 6, 2):
        b = ids[s : s + 2]
        with torch.no_grad():
            t = F.log_softmax(teacher(input_ids=b).logits[:, :-1], -1)
        q = F.log_softmax(ours(input_ids=b).logits[:, :-1], -1)
        loss = F.kl_div(q, t, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    theirs = copy.deepcopy(student).train()
    seconds = trl_gkd.train_seconds(
        theirs, teacher, tok, ids, batch=2, lr=1e-2, weight_decay=0.0, seed=0,
        device=torch.device("cpu"),
    )  # fmt: skip

    # AdamW moves each weight by about lr per step: another schedule, loss, order or decay
    # would leave the two students a sizeable fraction of that apart
    assert seconds > 0
    for (name, a), b, c in zip(
        ours.named_parameters(), theirs.parameters(), student.parameters(), strict=True
    ):
        assert float((a - b).abs().max()) < 1e-3, name
        assert float((a - c).abs().max()) > 1e-2, name
