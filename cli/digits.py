"""scikit-learn's digits and a small CNN for them: the demo's teacher and data, also used by the
example, the benchmarks and the tests.

Imports torch: the commands import this module only when they run, never at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from core.distill.data import split_indices
from core.distill.types import TransferSet
from core.errors import DatasetInvalid

# --- the data -----------------------------------------------------------------------------------


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits: x (1797, 1, 8, 8) float32 in [0, 1], y int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32)[:, None], bunch.target.astype(np.int64)


def _mask_labels(y: np.ndarray, label_fraction: float, seed: int) -> np.ndarray:
    """Keep about ``label_fraction`` of each class's labels; the rest become -1."""
    if not 0 <= label_fraction <= 1:
        raise DatasetInvalid(f"label_fraction must be in [0, 1], not {label_fraction}")
    rng = np.random.default_rng(seed + 1)
    out = np.full_like(y, -1)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        keep = idx[: int(np.ceil(len(idx) * label_fraction))]
        out[keep] = c
    return out


def digits_transfer_set(
    label_fraction: float = 1.0, seed: int = 0, val_fraction: float = 0.1
) -> TransferSet:
    """The digits as a transfer set; only ``label_fraction`` of the training labels are kept
    (the rest are -1), validation labels are all kept."""
    x, y = digits_arrays()
    train_idx, val_idx = split_indices(len(x), y, val_fraction, seed)
    return TransferSet(
        x_train=torch.from_numpy(x[train_idx]),
        y_train=torch.from_numpy(_mask_labels(y[train_idx], label_fraction, seed)),
        x_val=torch.from_numpy(x[val_idx]),
        y_val=torch.from_numpy(y[val_idx]),
        n_classes=10,
        class_names=[str(i) for i in range(10)],
    )


def write_digits_npz(
    path: Path, label_fraction: float = 1.0, seed: int = 0, val_fraction: float = 0.0
) -> Path:
    """Write the digits as an .npz (x, y; with x_val, y_val when ``val_fraction`` > 0), keeping
    ``label_fraction`` of the training labels."""
    x, y = digits_arrays()
    arrays: dict[str, np.ndarray] = {}
    if val_fraction > 0:
        train_idx, val_idx = split_indices(len(x), y, val_fraction, seed)
        arrays.update(x_val=x[val_idx], y_val=y[val_idx])
        x, y = x[train_idx], y[train_idx]
    if label_fraction > 0:
        arrays["y"] = _mask_labels(y, label_fraction, seed)
    np.savez(path, x=x, **arrays)
    return Path(path)


# --- the model ----------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """A small CNN for one-channel ``side``×``side`` digits, ten classes:

    conv(width) → conv(2·width) → max-pool 2 → [conv(2·width)] → pool → [linear(hidden)] →
    linear(10), ReLU after each conv and hidden layer. ``pool`` is ``"avg"`` (adaptive, to 2×2),
    ``"max"`` (max-pool 2) or ``"none"``. The defaults are the tests' reference teacher: about
    98 % test accuracy on the 8×8 digits after a few seconds of training.
    """

    def __init__(
        self,
        width: int = 32,
        hidden: int | None = 128,
        *,
        third_conv: bool = True,
        pool: Literal["avg", "max", "none"] = "avg",
        side: int = 8,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        if third_conv:
            layers += [nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool: nn.Module
        if pool == "avg":
            self.pool, grid = nn.AdaptiveAvgPool2d(2), 2
        elif pool == "max":
            self.pool, grid = nn.MaxPool2d(2), side // 4
        else:
            self.pool, grid = nn.Identity(), side // 2
        flat = 2 * width * grid * grid
        if hidden:
            self.head = nn.Sequential(
                nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 10)
            )
        else:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def train_classifier(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 30,
    *,
    lr: float = 2e-3,
    seed: int | None = 0,
) -> nn.Module:
    """Plain supervised training (Adam, batches of 64), in eval mode after; ``seed`` re-seeds
    torch first (None: go on from the caller's seed).

    One thread: a model this small trains several times faster so, above all on a busy CPU
    where OpenMP threads wait on each other (12 s against 70 s, measured).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xt))
            for i in range(0, len(xt), 64):
                idx = perm[i : i + 64]
                loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


# --- the demo's files ---------------------------------------------------------------------------


def make_files(
    folder: Path, teacher_epochs: int = 15, labelled: int = 100
) -> tuple[Path, Path, float]:
    """teacher.pt2 (a small DigitsCNN, torch.export, dynamic batch) and digits.npz (70/30 split)
    with ``labelled`` training labels kept (the rest -1); the teacher's validation accuracy."""
    x, y = digits_arrays()
    train, val = split_indices(len(x), y, 0.3, seed=0)
    x_tr, y_tr, x_va, y_va = x[train], y[train], x[val], y[val]

    torch.manual_seed(0)
    # About 97 % on the validation split after a few seconds of training.
    teacher = DigitsCNN(8, 64, third_conv=False, pool="none")
    train_classifier(teacher, x_tr, y_tr, teacher_epochs, lr=3e-3, seed=None)
    with torch.no_grad():
        accuracy = float((teacher(torch.from_numpy(x_va)).argmax(1).numpy() == y_va).mean())

    folder.mkdir(parents=True, exist_ok=True)
    teacher_path = folder / "teacher.pt2"
    batch = torch.export.Dim("batch", min=1, max=65536)
    xt = torch.from_numpy(x_tr)
    program = torch.export.export(teacher, (xt[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(teacher_path))

    rng = np.random.default_rng(0)
    labels = np.full_like(y_tr, -1)
    keep = rng.choice(len(y_tr), size=min(labelled, len(y_tr)), replace=False)
    labels[keep] = y_tr[keep]
    data_path = folder / "digits.npz"
    np.savez(data_path, x=x_tr, y=labels, x_val=x_va, y_val=y_va)
    return teacher_path, data_path, accuracy
