"""TRL's ``GKDTrainer`` as one arm of ``causal_kd_throughput``: supervised forward KL
(λ = 0, β = 0) from the teacher's full logits on every step.

TRL is the benchmark's extra requirement, not the project's: :func:`available` says why the arm
is skipped when it cannot be imported. The trainer is set up to do the work of the other arms
and nothing more: no evaluation, saving, logging or hub calls, no gradient clipping, a constant
learning rate, dropout left as the student has it, and the windows in the order given (the
other arms' shuffle) through a sequential sampler.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch


def available() -> str | None:
    """None when TRL can be used, else why it cannot."""
    try:
        import trl  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401
    except ImportError as exc:
        return f"TRL is not installed ({exc}); `pip install trl` to measure its GKD trainer"
    return None


class _StepClock:
    """Seconds from the first training step to the last (the trainer's set-up left out)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0.0
        self.end = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                _sync(clock.device)
                clock.start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                _sync(clock.device)
                clock.end = time.perf_counter()

        return Clock()


def train_seconds(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    ids: torch.Tensor,
    *,
    batch: int,
    lr: float,
    weight_decay: float,
    seed: int,
    device: torch.device,
) -> float:
    """Train ``student`` (a ``transformers`` causal LM) one epoch over the rows of ``ids``, in
    that order; the seconds its training steps took."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    ).with_format("torch")

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        x = torch.stack([r["input_ids"] for r in rows])
        return {
            "input_ids": x,
            "attention_mask": torch.stack([r["attention_mask"] for r in rows]),
            "labels": x,  # every position is a target, as in the other arms
        }

    out = tempfile.mkdtemp(prefix="trl-gkd-")
    config = GKDConfig(
        output_dir=out,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        disable_dropout=False,
        max_length=ids.shape[1],
        num_train_epochs=1,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=lr,
        weight_decay=weight_decay,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        seed=seed,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    clock = _StepClock(device)
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        data_collator=collate,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[clock.callback()],
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    trainer.train()
    steps = -(-len(ids) // batch)
    if trainer.state.global_step != steps:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} steps, not {steps}")
    return clock.end - clock.start


def versions() -> dict[str, str]:
    """The versions of the libraries the arms run on."""
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        found["trl"] = trl.__version__
    except ImportError:
        pass
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
