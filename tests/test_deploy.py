"""The deploy files: docker-compose.yml validates and wires every part of the service, takes
every secret from the environment and publishes nothing an operator did not ask for."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[1]
# What docker-compose.yml asks the operator for (docs/SECURITY.md).
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret-1",
    "REDIS_PASSWORD": "redis-secret-2",
    "MINIO_ROOT_USER": "root-user-3",
    "MINIO_ROOT_PASSWORD": "root-secret-4",
    "DISTILL_S3_ACCESS_KEY": "app-user-5",
    "DISTILL_S3_SECRET_KEY": "app-secret-6",
    "DISTILL_OPERATOR_TOKEN": "operator-token-7-long-enough",
    "FLOWER_BASIC_AUTH": "ops:flower-secret-8",
}


def _compose(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        message = "docker-compose is not installed (apt-get install docker-compose)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean, **env},
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with every secret set."""
    run = _compose(SECRETS)
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def test_compose_file_validates(config: dict[str, Any]) -> None:
    assert "api" in config["services"]


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(missing: str) -> None:
    run = _compose({k: v for k, v in SECRETS.items() if k != missing})
    assert run.returncode != 0 and missing in run.stderr, run.stderr


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for word in ("distill-secret", "PASSWORD: distill", "minioadmin"):
        assert word not in text
    for name, value in SECRETS.items():
        assert value not in text, name


def test_compose_has_every_part_with_production_settings(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in ("api", "worker-cpu", "worker-gpu", "redis", "postgres", "minio", "flower"):
        assert name in services, f"docker-compose.yml lacks {name}"
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert "--queues" in gpu["command"] and "gpu" in gpu["command"]
    env = services["api"]["environment"]
    for key in ("DISTILL_DATABASE_URL", "DISTILL_BROKER_URL", "DISTILL_STORAGE_URL"):
        assert key in env
    assert SECRETS["POSTGRES_PASSWORD"] in env["DISTILL_DATABASE_URL"]
    assert SECRETS["REDIS_PASSWORD"] in env["DISTILL_BROKER_URL"]
    assert env["DISTILL_OPERATOR_TOKEN"] == SECRETS["DISTILL_OPERATOR_TOKEN"]


def _published(service: dict[str, Any]) -> list[str]:
    """Each published port as 'host_ip:published' (docker-compose 1.29 prints long or short)."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(f"{port.get('host_ip', '0.0.0.0')}:{port['published']}")
        else:
            parts = str(port).split(":")
            out.append("0.0.0.0:" + parts[0] if len(parts) == 2 else f"{parts[0]}:{parts[1]}")
    return out


def test_only_the_api_is_published_to_the_network(config: dict[str, Any]) -> None:
    public = {
        name: ports
        for name, service in config["services"].items()
        if (ports := [p for p in _published(service) if not p.startswith("127.0.0.1:")])
    }
    assert public == {"api": ["0.0.0.0:8000"]}
    flower = config["services"]["flower"]
    assert flower["profiles"] == ["ops"]  # not started by a plain `up`
    assert f"--basic-auth={SECRETS['FLOWER_BASIC_AUTH']}" in flower["command"]
    assert "9001" not in str(config["services"]["minio"].get("ports", []))


def test_storage_keys_only_where_storage_is_used(config: dict[str, Any]) -> None:
    def keys(name: str) -> set[str]:
        env = config["services"][name].get("environment", {})
        values = " ".join(str(v) for v in env.values()) + " " + str(config["services"][name])
        return {
            secret
            for secret in ("MINIO_ROOT_PASSWORD", "DISTILL_S3_SECRET_KEY")
            if SECRETS[secret] in values
        }

    for name in ("api", "worker-cpu", "worker-gpu", "beat"):
        assert keys(name) == {"DISTILL_S3_SECRET_KEY"}, name  # the service's user, never root
        assert (
            config["services"][name]["environment"]["AWS_ACCESS_KEY_ID"]
            == SECRETS["DISTILL_S3_ACCESS_KEY"]
        )
    for name in ("migrate", "postgres", "redis", "flower"):
        assert keys(name) == set(), name
    assert keys("minio") == {"MINIO_ROOT_PASSWORD"}
    # The operator token is the API's alone.
    for name, service in config["services"].items():
        if name != "api":
            assert SECRETS["DISTILL_OPERATOR_TOKEN"] not in str(service), name


def test_the_bucket_job_gives_the_service_a_user_for_its_bucket_only(
    config: dict[str, Any],
) -> None:
    command = " ".join(config["services"]["minio-bucket"]["command"])
    assert "mc admin user add" in command and "policy attach" in command
    assert re.search(r'"Resource":\["arn:aws:s3:::distill","arn:aws:s3:::distill/\*"\]', command)


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.index('pip install "torch==') < text.index("pip install .")
    assert "TORCH_INDEX_URL" in text
