"""The digits data and CNN that the demo, the example, the benchmarks and the tests share."""

from __future__ import annotations

import pytest
import torch

from cli.digits import DigitsCNN, digits_transfer_set


def test_digits_transfer_set_with_few_labels() -> None:
    ts = digits_transfer_set(label_fraction=0.2, seed=0)
    assert ts.x_train.shape[1:] == (1, 8, 8) and ts.n_classes == 10
    assert 0.19 < (ts.y_train >= 0).float().mean().item() < 0.22
    assert (ts.y_val >= 0).all()
    assert len(ts.x_val) == pytest.approx(180, abs=5)


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "side", "parameters"),
    [
        # The tests' reference teacher; layer names such as features.2 and head.3 are part of it.
        (DigitsCNN(), 8, 89_930),
        # The demo's teacher: `distill demo` prints its parameter count.
        (DigitsCNN(8, 64, third_conv=False, pool="none"), 8, 18_346),
        # bench/speedup_spread.py and bench/train_throughput.py (16×16 digits).
        (DigitsCNN(hidden=None, third_conv=False, pool="none"), 8, 29_066),
        (DigitsCNN(16, side=16, pool="max"), 16, 81_002),
    ],
)
def test_each_digits_cnn_maps_a_batch_to_ten_logits(
    model: DigitsCNN, side: int, parameters: int
) -> None:
    assert model(torch.rand(3, 1, side, side)).shape == (3, 10)
    assert _parameters(model) == parameters


def test_the_reference_teacher_keeps_its_layer_names() -> None:
    names = dict(DigitsCNN().named_modules())
    assert isinstance(names["features.2"], torch.nn.Conv2d)
    assert isinstance(names["head.3"], torch.nn.Linear) and names["head.3"].out_features == 10
