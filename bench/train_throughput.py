"""Training throughput: a hand-written KD loop against the engine's trainer, same everything.

The hand-written loop is the one the PyTorch knowledge-distillation tutorial teaches: on every
step the frozen teacher runs forward on the batch, and the student minimises
``alpha * T² * KL(student/T ‖ teacher/T) + (1 - alpha) * CE``. The engine runs the same job with
``trainer.train`` and the ``kd`` method, once with its teacher-output cache (the teacher runs once
over the transfer set instead of once per epoch) and once without.

Same teacher, student, data, optimizer, schedule, epochs and seed for all three; the teacher is
sized so that its forward pass costs about 5× a student training step (printed), which bounds
the speedup from caching at 10·(5+1) / (5 + 10·1) = 4×.

    python -m bench.train_throughput                       # CPU, fp32, about 2-3 minutes
    python -m bench.train_throughput --device cuda --precision bf16 --samples 200000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPOCHS = 10
BATCH = 128
LR = 1e-3
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
TEMPERATURE = 4.0
ALPHA = 0.9
SIDE = 16  # digits (8×8) upsampled to 16×16


# --- data: a synthetic transfer set built from sklearn's digits --------------------------------


def make_data(n_train: int, n_test: int, seed: int) -> dict[str, torch.Tensor]:
    """Digits upsampled to 16×16 and jittered (shift, scale, noise) into a larger set.

    Train and test images come from disjoint halves of the original digits, so the test
    accuracy is measured on digits neither network has seen in any form.
    """
    from sklearn.model_selection import train_test_split

    from cli.digits import digits_arrays

    x_np, y_np = digits_arrays()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    idx_tr, idx_te = train_test_split(
        np.arange(len(x)), test_size=0.3, random_state=seed, stratify=y_np
    )
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = _jitter(x[idx_tr], y[idx_tr], n_train, gen)
    x_te, y_te = _jitter(x[idx_te], y[idx_te], n_test, gen)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def _jitter(
    x: torch.Tensor, y: torch.Tensor, n: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    pick = torch.randint(len(x), (n,), generator=gen)
    images = F.interpolate(x[pick], size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    scale = 1 + 0.15 * (torch.rand(n, generator=gen) * 2 - 1)
    shift = 0.15 * (torch.rand(n, 2, generator=gen) * 2 - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    images = (images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1)
    return images.contiguous(), y[pick]


# --- networks ----------------------------------------------------------------------------------


def make_teacher(width: int) -> nn.Module:
    """The digits CNN for 16×16 inputs; ``width`` sets its cost relative to the student."""
    from cli.digits import DigitsCNN

    return DigitsCNN(width, side=SIDE, pool="max")


def make_student() -> nn.Module:
    """The engine's ``mlp`` preset at width 256, depth 2 (built the same way for both loops)."""
    from core.distill.students import build_student
    from core.spec import StudentSpec

    return build_student(
        StudentSpec(preset="mlp", width=256, depth=2).filled(),
        input_shape=(1, SIDE, SIDE),
        input_dtype=torch.float32,
        output_dim=10,
        teacher=None,
        model_file=None,
    )


def train_teacher(
    x: torch.Tensor, y: torch.Tensor, width: int, epochs: int, device: torch.device, seed: int
) -> nn.Module:
    torch.manual_seed(seed)
    model = make_teacher(width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            idx = perm[i : i + BATCH]
            loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


# --- measurements ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> Any:
    enabled = precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def kd_step(
    student: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    xb: torch.Tensor,
    yb: torch.Tensor,
    teacher_logits: torch.Tensor,
    device: torch.device,
    precision: str,
) -> None:
    """One student step of the tutorial's loop: KL at T (scaled by T²) plus CE, then clip."""
    with _autocast(device, precision):
        logits = student(xb)
    soft = F.kl_div(
        F.log_softmax(logits.float() / TEMPERATURE, dim=-1),
        F.log_softmax(teacher_logits.float() / TEMPERATURE, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    loss = ALPHA * TEMPERATURE**2 * soft + (1 - ALPHA) * F.cross_entropy(logits.float(), yb)
    loss.backward()
    nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()


def _optimizer(student: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with the engine's defaults and a cosine decay to zero over ``steps``."""
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def cost_ratio(
    teacher: nn.Module, x: torch.Tensor, device: torch.device, precision: str, reps: int = 30
) -> dict[str, float]:
    """Seconds per teacher forward and per student training step (the loop's whole step but
    the teacher: forward, KD loss, backward, clip, optimizer) on one batch, and their ratio."""
    batch = x[:BATCH].to(device)
    target = torch.randint(10, (BATCH,), device=device)
    student = make_student().to(device).train()
    opt, sched = _optimizer(student, 10_000)
    with torch.no_grad():
        logits = teacher(batch)

    def teacher_forward() -> None:
        with torch.no_grad(), _autocast(device, precision):
            teacher(batch)

    def student_step() -> None:
        kd_step(student, opt, sched, batch, target, logits, device, precision)

    def timed(fn: Any) -> float:
        for _ in range(5):
            fn()
        _sync(device)
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            _sync(device)
            best = min(best, (time.perf_counter() - start) / reps)
        return best

    t, s = timed(teacher_forward), timed(student_step)
    return {"teacher_forward_s": t, "student_step_s": s, "ratio": t / s}


WIDTHS = (8, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def choose_teacher_width(
    x: torch.Tensor, device: torch.device, precision: str, target: float = 5.0
) -> int:
    """The teacher width whose forward costs closest to ``target`` student steps here."""
    best, best_gap = WIDTHS[0], math.inf
    for width in WIDTHS:
        torch.manual_seed(0)
        teacher = make_teacher(width).to(device).eval()
        ratio = cost_ratio(teacher, x, device, precision, reps=10)["ratio"]
        gap = abs(math.log(ratio / target))
        if gap < best_gap:
            best, best_gap = width, gap
        if ratio > 2 * target:
            break
    return best


def hand_written_kd(
    teacher: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    device: torch.device,
    precision: str,
    seed: int,
    epochs: int = EPOCHS,
) -> tuple[nn.Module, float]:
    """The tutorial's loop: teacher forward on every step, then the KD step. (model, seconds)"""
    torch.manual_seed(seed)
    student = make_student().to(device).train()
    teacher = teacher.to(device).eval()
    opt, sched = _optimizer(student, epochs * math.ceil(len(x_train) / BATCH))
    x_train, y_train = x_train.to(device), y_train.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=shuffle).to(device)
        for i in range(0, len(x_train), BATCH):
            idx = perm[i : i + BATCH]
            xb, yb = x_train[idx], y_train[idx]
            with torch.no_grad(), _autocast(device, precision):
                teacher_logits = teacher(xb)
            kd_step(student, opt, sched, xb, yb, teacher_logits, device, precision)
    _sync(device)
    return student.eval(), time.perf_counter() - start


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    model = model.to(device).eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), 1024):
            pred = model(x[i : i + 1024].to(device)).argmax(-1).cpu()
            correct += int((pred == y[i : i + 1024]).sum())
    return correct / len(x)


def engine_kd(
    teacher: nn.Module,
    data: dict[str, torch.Tensor],
    device: torch.device,
    precision: str,
    seed: int,
    *,
    cache: bool,
    epochs: int = EPOCHS,
    quiet: bool = False,
) -> tuple[nn.Module, float]:
    """The same job through the engine: ``trainer.train`` with the ``kd`` method."""
    from core.distill.methods import build_method
    from core.distill.teachers import ModuleTeacher
    from core.distill.trainer import train
    from core.distill.types import Event, TransferSet
    from core.spec import KDMethod, ModelInfo, TensorInfo, TrainingSpec

    torch.manual_seed(seed)
    student = make_student()
    info = ModelInfo(
        format="module",
        inputs=[TensorInfo(shape=[None, 1, SIDE, SIDE], dtype="float32")],
        outputs=[TensorInfo(shape=[None, 10], dtype="float32")],
    )
    frozen = ModuleTeacher(copy.deepcopy(teacher).to(device), info)
    transfer = TransferSet(
        x_train=data["x_train"],
        y_train=data["y_train"],
        x_val=data["x_val"],
        y_val=data["y_val"],
        n_classes=10,
    )
    training = TrainingSpec(
        epochs=epochs,
        batch_size=BATCH,
        lr=LR,
        optimizer="adamw",
        weight_decay=WEIGHT_DECAY,
        grad_clip=GRAD_CLIP,
        seed=seed,
        device=str(device),
        precision=precision,
        early_stopping_patience=None,
        cache_teacher_outputs=cache,
        baseline=False,
    )
    method = build_method(
        KDMethod(temperature=TEMPERATURE, alpha=ALPHA),
        student=student,
        teacher=frozen,
        task="classification",
        n_classes=10,
        epochs=epochs,
    )
    epoch_seconds: list[float] = []

    def progress(event: Event) -> None:
        if event.type == "metrics":
            epoch_seconds.append(float(event.data["seconds"]))

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as ckpt:
        _sync(device)
        start = time.perf_counter()
        result = train(
            student,
            method,
            transfer,
            frozen,
            training,
            task="classification",
            stage=1,
            stages=1,
            progress=progress,
            should_stop=lambda: False,
            checkpoint_dir=Path(ckpt),
            label="bench",
        )
        _sync(device)
        seconds = time.perf_counter() - start
    if not quiet:
        in_epochs = sum(epoch_seconds)
        print(
            f"    engine (cache {'on' if cache else 'off'}): {in_epochs:.2f} s in epochs "
            f"(training steps and validation), {seconds - in_epochs:.2f} s outside them "
            "(teacher-output cache, setup, checkpoints)"
        )
    return result.model.eval(), seconds


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    seconds: float
    accuracy: float
    samples: int

    def as_dict(self, baseline_s: float) -> dict[str, Any]:
        return {
            "loop": self.name,
            "seconds": round(self.seconds, 2),
            "samples_per_s": round(self.samples / self.seconds),
            "speedup": round(baseline_s / self.seconds, 2),
            "test_accuracy": round(self.accuracy, 4),
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="KD training throughput: hand loop vs engine.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--samples", type=int, default=24_000, help="transfer-set size")
    parser.add_argument(
        "--teacher-width", type=int, default=0, help="0: the width whose cost ratio is nearest 5"
    )
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is available here")
    n_val = max(args.samples // 20, 500)
    data = make_data(args.samples + n_val, 5000, args.seed)
    # A validation split for the engine's per-epoch evaluation; test is held out for both.
    data["x_val"], data["y_val"] = data["x_train"][-n_val:], data["y_train"][-n_val:]
    x_train, y_train = data["x_train"][:-n_val], data["y_train"][:-n_val]
    data["x_train"], data["y_train"] = x_train, y_train

    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"precision {args.precision}"
    )
    print(f"transfer set {tuple(x_train.shape)}, test {tuple(data['x_test'].shape)}")
    width = args.teacher_width or choose_teacher_width(x_train, device, args.precision)
    print(f"teacher: CNN of width {width}")
    teacher = train_teacher(x_train, y_train, width, args.teacher_epochs, device, args.seed)
    teacher_acc = accuracy(teacher, data["x_test"], data["y_test"], device)
    ratio = cost_ratio(teacher, x_train, device, args.precision)
    print(f"teacher test accuracy {teacher_acc:.4f}")
    print(
        f"teacher forward {1000 * ratio['teacher_forward_s']:.2f} ms vs student training step "
        f"{1000 * ratio['student_step_s']:.2f} ms per batch of {BATCH}: "
        f"ratio {ratio['ratio']:.2f} (cache bound {_bound(ratio['ratio']):.2f}x)"
    )

    # One short untimed pass of each loop first, so that no loop pays for warming up.
    few = {"x_train": x_train[:1024], "y_train": y_train[:1024]}
    hand_written_kd(teacher, few["x_train"], few["y_train"], device, args.precision, 0, epochs=1)
    for cache in (True, False):
        engine_kd(
            teacher, {**data, **few}, device, args.precision, 0, cache=cache, epochs=1, quiet=True
        )

    samples = EPOCHS * len(x_train)
    rows: list[Row] = []
    for name, run in (
        (
            "hand-written KD loop",
            lambda: hand_written_kd(teacher, x_train, y_train, device, args.precision, args.seed),
        ),
        (
            "engine, teacher cache on",
            lambda: engine_kd(teacher, data, device, args.precision, args.seed, cache=True),
        ),
        (
            "engine, teacher cache off",
            lambda: engine_kd(teacher, data, device, args.precision, args.seed, cache=False),
        ),
    ):
        model, seconds = run()
        acc = accuracy(model, data["x_test"], data["y_test"], device)
        rows.append(Row(name, seconds, acc, samples))
        print(f"  {name:28s} {seconds:7.2f} s  {samples / seconds:9.0f} samples/s  acc {acc:.4f}")

    base = rows[0].seconds
    table = [r.as_dict(base) for r in rows]
    print()
    print("| loop | seconds | samples/s | speedup | test accuracy |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in table:
        print(
            f"| {r['loop']} | {r['seconds']:.2f} | {r['samples_per_s']:,} | "
            f"{r['speedup']:.2f}x | {100 * r['test_accuracy']:.2f} % |"
        )
    report = {
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "samples": len(x_train),
        "epochs": EPOCHS,
        "teacher_width": width,
        "teacher_accuracy": teacher_acc,
        "cost": ratio,
        "bound": _bound(ratio["ratio"]),
        "rows": table,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _bound(ratio: float) -> float:
    """Best possible speedup from caching: per epoch, (teacher + student) vs student, plus one
    teacher pass over the data."""
    return EPOCHS * (ratio + 1) / (ratio + EPOCHS)


if __name__ == "__main__":
    main()
