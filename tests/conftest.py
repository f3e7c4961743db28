"""Shared fixtures: the digits data, a small CNN teacher trained once per session, services.

The CNN and its training live with the digits data in cli/digits.py.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

from cli.digits import DigitsCNN, digits_arrays, train_classifier

REQUIRE_SERVICES = os.environ.get("DISTILL_REQUIRE_SERVICES") == "1"
POSTGRES_URL = os.environ.get(
    "DISTILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DISTILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip when a server is not running; fail instead under CI (DISTILL_REQUIRE_SERVICES=1)."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}; start it (see README, 'Tests')"
    if REQUIRE_SERVICES:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """load_digits split 70/30 (stratified, seed 0); x is (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.model_selection import train_test_split

    x, y = digits_arrays()
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


@pytest.fixture(scope="session")
def digits_teacher(digits: dict[str, np.ndarray]) -> nn.Module:
    """A DigitsCNN trained on the full digits training split (eval mode)."""
    torch.manual_seed(0)
    return train_classifier(DigitsCNN(), digits["x_train"], digits["y_train"])


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())
