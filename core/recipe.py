"""The default recipe: training settings and a default student chosen from the data's size and
the teacher's, before anything runs (the learning rate, which needs the data itself, is found by
the engine: ``core.distill.lr_finder``).

Pure arithmetic on counts, so the API can complete a spec without torch. docs/SPEC.md ("The
recipe") states the rules; these are their one home.
"""

from __future__ import annotations

import math

MIN_BATCH, MAX_BATCH = 8, 256
BATCHES_PER_EPOCH = 16  # at least this many steps per epoch, while the batch is above MIN_BATCH
TARGET_STEPS = 2000  # optimizer steps a job aims for (Adam on a small student: enough to settle)
MIN_EPOCHS, MAX_EPOCHS = 10, 300
WARMUP_SHARE, MIN_WARMUP_STEPS, MAX_WARMUP_STEPS = 0.03, 10, 500
MAX_WIDTH = 128  # the mlp preset's width when the teacher leaves room
SHRINK = 10  # the default student aims for this many times fewer parameters than the teacher


def batch_size(n_train: int) -> int:
    """A power of two giving about BATCHES_PER_EPOCH steps per epoch, within [8, 256]."""
    target = max(n_train // BATCHES_PER_EPOCH, 1)
    size = 1 << (target.bit_length() - 1)
    return max(1, min(MAX_BATCH, max(MIN_BATCH, size), n_train))


def steps_per_epoch(n_train: int, batch: int) -> int:
    # As the trainer counts them: a trailing batch of one sample is dropped.
    return max(1, n_train // batch + (1 if n_train % batch > 1 else 0))


def epochs(n_train: int, batch: int) -> int:
    """Enough epochs for TARGET_STEPS optimizer steps, within [10, 300]."""
    return max(
        MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch(n_train, batch)))
    )


def warmup_epochs(n_train: int, batch: int, n_epochs: int) -> float:
    """About 3% of the steps (10 to 500 of them), in epochs."""
    per_epoch = steps_per_epoch(n_train, batch)
    steps = WARMUP_SHARE * per_epoch * n_epochs
    steps = max(MIN_WARMUP_STEPS, min(MAX_WARMUP_STEPS, steps))
    return round(min(steps / per_epoch, n_epochs / 4), 3)


def patience(n_epochs: int) -> int:
    """Early stopping waits a third of the run (at least 10 epochs): the cosine schedule's
    late, small steps often still improve, and a small validation split is noisy."""
    return max(10, math.ceil(n_epochs / 3))


def mlp_parameters(n_in: int, n_out: int, width: int, depth: int) -> int:
    if depth == 0:
        return n_in * n_out + n_out
    return n_in * width + width + (depth - 1) * (width * width + width) + width * n_out + n_out


def mlp_size(n_in: int, n_out: int, teacher_parameters: int | None) -> tuple[int, int]:
    """(width, depth) of the default mlp student: SHRINK× fewer parameters than the teacher
    where a useful network fits, never more than the teacher (depth 0 is a linear model)."""
    if not teacher_parameters:
        return MAX_WIDTH, 2
    tries = [
        (teacher_parameters / SHRINK, 2, 32),
        (teacher_parameters / SHRINK, 1, 8),
        (teacher_parameters / 2, 1, 8),
    ]
    for budget, depth, min_width in tries:
        width = _widest(n_in, n_out, depth, budget)
        if width >= min_width:
            return width, depth
    return 1, 0


def _widest(n_in: int, n_out: int, depth: int, budget: float) -> int:
    for width in range(MAX_WIDTH, 0, -1):
        if mlp_parameters(n_in, n_out, width, depth) <= budget:
            return width
    return 0
