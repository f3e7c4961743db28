"""The deploy files: docker-compose.yml validates and wires every part of the service."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_validates() -> None:
    if shutil.which("docker-compose") is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr


def test_compose_has_every_part_with_production_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("api", "worker-cpu", "worker-gpu", "redis", "postgres", "minio", "flower"):
        assert name in services, f"docker-compose.yml lacks {name}"
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "--queues" in gpu["command"] and "gpu" in gpu["command"]
    env = services["api"]["environment"]
    for key in ("DISTILL_DATABASE_URL", "DISTILL_BROKER_URL", "DISTILL_STORAGE_URL"):
        assert key in env


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.index('pip install "torch==') < text.index("pip install .")
    assert "TORCH_INDEX_URL" in text
