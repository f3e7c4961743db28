"""Write the example's teacher (teacher.pt2) and transfer set (digits.npz) beside this file.

The teacher is a small CNN trained on sklearn's digits (about 98% validation accuracy, a few
seconds on a CPU), saved with ``torch.export``. The transfer set keeps every training image but
only ``--labelled`` of their labels (the others are -1), plus a labelled validation split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): digits as (N, 1, 8, 8) float32 in [0, 1], 70/30."""
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr, y_tr, x_va, y_va


def train_teacher(x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsCNN()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def save_teacher(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """Save with torch.export, the batch dimension left dynamic."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def write_transfer_set(
    path: Path,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    labelled: int,
    seed: int = 0,
) -> None:
    """digits.npz with only ``labelled`` training labels kept (the rest -1)."""
    rng = np.random.default_rng(seed)
    y = np.full_like(y_tr, -1)
    keep = rng.choice(len(y_tr), size=min(labelled, len(y_tr)), replace=False)
    y[keep] = y_tr[keep]
    np.savez(path, x=x_tr, y=y, x_val=x_va, y_val=y_va)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the two files")
    parser.add_argument("--labelled", type=int, default=100, help="training labels to keep")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_va, y_va = digits_split()
    teacher = train_teacher(x_tr, y_tr)
    with torch.no_grad():
        acc = (teacher(torch.from_numpy(x_va)).argmax(1).numpy() == y_va).mean()
    save_teacher(teacher, args.out / "teacher.pt2", torch.from_numpy(x_tr[:2]))
    write_transfer_set(args.out / "digits.npz", x_tr, y_tr, x_va, y_va, args.labelled)
    print(f"teacher validation accuracy {acc:.3f}; wrote {args.out}/teacher.pt2 and digits.npz")


if __name__ == "__main__":
    main()
