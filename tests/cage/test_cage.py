"""The cage around every process that opens an uploaded model: what it keeps out of reach.

The same hostile attempts (tests/cage/probe.py) run as an upload inspection (the sandbox) and as
a job's engine (the worker's child process). Nothing here is mocked: bubblewrap builds the cage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.config import Settings
from core.distill import cage
from core.distill.cage import CageLimits
from core.distill.inspect import inspect_model_file
from core.distill.sandbox import run_sandboxed
from core.errors import UnsafeModelFile
from tests.cage.probe import MARKER
from tests.core.model_files import save_torchscript
from tests.service.api_support import build_api
from tests.service.helpers import migrate
from tests.service.test_worker_runner import Env

SECRETS = {
    "DISTILL_DATABASE_URL": "postgresql://distill:db-password-123@127.0.0.1/distill",
    "DISTILL_BROKER_URL": "redis://:broker-password-456@127.0.0.1:6379/0",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-789",
}


@pytest.fixture(autouse=True)
def cage_required() -> None:
    problem = cage.cage_problem()
    if problem is not None:
        if os.environ.get("DISTILL_REQUIRE_SERVICES"):
            pytest.fail(f"the cage is required here: {problem}")
        pytest.skip(problem)


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _targets(tmp_path: Path) -> tuple[dict, Path, Path]:
    secret = tmp_path / "data" / "distill.db"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"SQLite format 3\x00 tenant A's storage key")
    target = tmp_path / "outside" / "target.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"original bytes")
    os.chmod(target, 0o666)  # writable by anyone on the host: only the cage's view protects it
    targets = {
        "read": ["/etc/passwd", "/etc/shadow", str(secret), "/proc/1/environ"],
        "write": [str(target), str(secret)],
        "ports": [5432, 6379],
    }
    return targets, secret, target


def _assert_nothing_reached(found: dict, target: Path) -> None:
    assert found["uid"] == cage.CAGE_UID and found["gid"] == cage.CAGE_UID
    for path, outcome in found["read"].items():
        assert outcome.startswith("refused"), f"{path} was readable: {outcome!r}"
    for path, outcome in found["write"].items():
        assert outcome.startswith("refused"), f"{path} was writable"
    assert target.read_bytes() == b"original bytes"
    for port, outcome in found["connect"].items():
        assert outcome.startswith("refused"), f"port {port} was reachable"
    env_text = json.dumps(found["env"])
    for name, value in SECRETS.items():
        assert name not in found["env"] and value not in env_text
    # Only the path of its own tenant's teacher cache, if anything.
    assert set(n for n in found["env"] if n.startswith("DISTILL_")) <= {"DISTILL_LM_CACHE_DIR"}
    assert len(found["processes"]) <= 3  # its own and bubblewrap's, nothing of the host


def test_an_upload_inspection_reaches_no_file_socket_or_secret(
    tmp_path: Path, secrets_in_env: None
) -> None:
    targets, _, target = _targets(tmp_path)
    request = tmp_path / "targets.json"
    request.write_text(json.dumps(targets))
    found = run_sandboxed(
        "tests.cage.probe:inspect_in_cage",
        {},
        files={"path": request},
        timeout_s=60,
        memory_mb=2048,
    )
    _assert_nothing_reached(found, target)


def test_a_job_process_reaches_no_file_socket_or_secret(
    tmp_path: Path, secrets_in_env: None
) -> None:
    env = Env(tmp_path)
    targets, _, target = _targets(tmp_path)
    other_tenant = tmp_path / "data" / "lm-cache" / "ten_other" / "cache.bin"
    other_tenant.parent.mkdir(parents=True)
    other_tenant.write_bytes(b"another tenant's teacher logits")
    targets["read"] += [str(tmp_path / "distill.db"), str(tmp_path / "blobs"), str(other_tenant)]
    targets["write"] += [str(tmp_path / "distill.db")]
    database_before = (tmp_path / "distill.db").read_bytes()
    job_id = env.submit("probe")
    with env.sessions() as s:  # the dataset of this job is the list of targets
        from core.models import Dataset, Job

        dataset = s.get(Dataset, s.get(Job, job_id).spec["dataset_id"])
        Path(env.storage.path(dataset.storage_key)).write_text(json.dumps(targets))
    from core.jobs import claim_job
    from worker.runner import RunEnd, run_claimed_job

    with env.sessions() as s:
        assert claim_job(s, job_id, "w1", 30) is not None
    status = run_claimed_job(
        job_id,
        "w1",
        settings=env.settings,
        session_factory=env.sessions,
        storage=env.storage,
        engine="tests.cage.probe:run_job",
    )
    assert status == RunEnd.SUCCEEDED
    found = env.job(job_id).result
    _assert_nothing_reached(found, target)
    assert found["inputs_writable"] is False
    # Its own tenant's teacher cache is there and writable; another tenant's is not (above).
    own = Path(found["env"]["DISTILL_LM_CACHE_DIR"])
    assert own.parent == (tmp_path / "data" / "lm-cache").resolve()
    assert own.name == env.job(job_id).tenant_id
    assert MARKER not in (tmp_path / "distill.db").read_bytes()
    assert len((tmp_path / "distill.db").read_bytes()) >= len(database_before) // 2


def _run(argv: list[str], limits: CageLimits) -> subprocess.CompletedProcess[str]:
    command = cage.command(argv, scratch=None, limits=limits)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_the_cage_limits_processes_and_written_bytes(tmp_path: Path) -> None:
    threads = (
        "import threading, time\n"
        "started = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "        started += 1\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print(started)\n"
    )
    done = _run([sys.executable, "-c", threads], CageLimits(processes=20))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 20
    write = "open('/tmp/big', 'wb').write(b'x' * (3 * 2**20))"
    done = _run([sys.executable, "-c", write], CageLimits(file_mb=1))
    assert cage.exit_status(done.returncode) != 0
    assert not (tmp_path / "big").exists()


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_without_a_cage_programs_are_refused_unless_the_operator_opts_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = save_torchscript(Doubler(), tmp_path / "doubler.pt")
    monkeypatch.setenv("DISTILL_CAGE_BWRAP", str(tmp_path / "no-bwrap"))
    found = cage.isolation("on")
    assert not found.caged and "bubblewrap" in (found.reason or "")
    with pytest.raises(UnsafeModelFile, match="no cage"):
        inspect_model_file(model, input_shape=[4], isolation=found)
    # The operator's explicit choice: opened, uncaged.
    opened = inspect_model_file(model, input_shape=[4], isolation=cage.isolation("off"))
    assert opened.format == "torchscript"


def test_without_a_cage_a_torchscript_upload_gets_a_clear_422(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_CAGE_BWRAP", str(tmp_path / "no-bwrap"))
    url = f"sqlite:///{tmp_path / 'distill.db'}"
    migrate(url)
    api = build_api(url, tmp_path)
    tenant = api.tenant()
    data = save_torchscript(Doubler(), tmp_path / "doubler.pt").read_bytes()
    r = api.client.post(
        "/v1/models",
        files={"file": ("doubler.pt", data)},
        data={"input_shape": "[4]"},
        headers=tenant.headers,
    )
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "unsafe_model_file"
    assert "ONNX" in error["message"] and "bubblewrap" in error["message"]


def test_the_operator_is_warned_at_start_when_uploads_run_uncaged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from core.config import warn_about_isolation

    with caplog.at_level(logging.WARNING):
        warn_about_isolation(Settings(cage="off"), logging.getLogger("test"))
    assert "UNCAGED" in caplog.text


def test_a_job_with_a_program_teacher_fails_clearly_without_a_cage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL_CAGE_BWRAP", str(tmp_path / "no-bwrap"))
    env = Env(tmp_path)
    job_id = env.submit("ok")
    with env.sessions() as s:
        from core.models import Model

        for model in s.query(Model):
            model.format = "torchscript"
        s.commit()
    with pytest.raises(UnsafeModelFile, match="no cage"):
        env.claim_and_run(job_id)


def test_no_network_inside(tmp_path: Path) -> None:
    code = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5432', timeout=2)"
    done = _run([sys.executable, "-c", code], CageLimits())
    assert done.returncode != 0
    assert "Connection refused" in done.stderr or "unreachable" in done.stderr
