"""The README works as written: in a fresh clone, `make serve` sets up a new virtual environment
and starts the service, and the curl walkthrough, run verbatim, ends with a student that loads."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PORT = 8000  # the README's walkthrough uses this port


def bash_blocks(section: str) -> list[str]:
    """The ```bash blocks of a README section (from its heading to the next one)."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.DOTALL)


def test_quick_start_is_two_commands() -> None:
    lines = [
        line.split("#")[0].strip()
        for line in bash_blocks("Quick start")[0].splitlines()
        if line.split("#")[0].strip()
    ]
    assert lines == ["make serve", "make test"]


@pytest.mark.slow
def test_make_serve_and_the_curl_walkthrough_work_in_a_fresh_clone(tmp_path: Path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", PORT)) == 0:
            message = f"port {PORT} is taken; the README's walkthrough needs it"
            if REQUIRE_SERVICES:
                pytest.fail(message)
            pytest.skip(message)
    clone = tmp_path / "distill"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # Nothing of this checkout may leak in: the clone runs its own code in its own venv.
    drop = ("DISTILL_", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if ".venv" not in p)
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen(
        ["make", "serve"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(serve, tmp_path / "serve.log", timeout=900)
        walkthrough = bash_blocks("Walkthrough with curl")[0]
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
        assert '"status": "succeeded"' in run.stdout
        _every_event_was_paged_through(run.stdout)
        _the_student_ran(run.stdout)
        _student_reproduces_the_job(clone)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        log.close()


def _wait_healthy(proc: subprocess.Popen, log: Path, timeout: float) -> None:
    # Our own service: its "running at" line comes once its API answers. (Polling the port alone
    # could find another service that took the port while this one was installing; ours then
    # exits, saying the port is taken.)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"make serve exited:\n{log.read_text()[-4000:]}")
        if f"distill is running at http://127.0.0.1:{PORT}" not in log.read_text(errors="replace"):
            time.sleep(2)
            continue
        try:
            if httpx.get(f"http://127.0.0.1:{PORT}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"the service did not become ready:\n{log.read_text()[-4000:]}")


def _every_event_was_paged_through(stdout: str) -> None:
    """The events step printed every page: seq 1..n in order, ending with the final status."""
    pages = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"data":')]
    events = [e for page in pages for e in page["data"]]
    assert len(pages) >= 2 and not pages[-1]["has_more"], [len(p["data"]) for p in pages]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "succeeded"


def _the_student_ran(stdout: str) -> None:
    """The last step's five lines ran the ONNX student on ten digits."""
    line = next(line for line in stdout.splitlines() if line.startswith("predicted"))
    predicted, true = (re.findall(r"\d", part) for part in line.split("true"))
    assert len(predicted) == len(true) == 10
    assert sum(p == t for p, t in zip(predicted, true, strict=True)) >= 8, line


def test_the_scikit_learn_section_makes_an_onnx_teacher_the_service_reads(tmp_path: Path) -> None:
    import joblib
    import onnxruntime
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier

    from core.distill.formats import detect_format

    x, y = load_breast_cancer(return_X_y=True)
    model = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    joblib.dump(model, tmp_path / "model.joblib")
    np.save(tmp_path / "x.npy", x)
    (snippet,) = re.findall(
        r"```python\n(.*?)```", README.split("## Your own scikit-learn teacher\n", 1)[1], re.DOTALL
    )
    run = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert detect_format(tmp_path / "teacher.onnx") == "onnx"
    session = onnxruntime.InferenceSession(str(tmp_path / "teacher.onnx"))
    probabilities = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[1]
    np.testing.assert_allclose(probabilities, model.predict_proba(x), atol=1e-5)
    assert np.load(tmp_path / "transfer.npz")["x"].shape == x.shape


def _student_reproduces_the_job(clone: Path) -> None:
    import onnxruntime

    jobs = httpx.get(f"http://127.0.0.1:{PORT}/v1/jobs").json()["data"]
    job = jobs[0]
    assert job["status"] == "succeeded"
    arts = httpx.get(f"http://127.0.0.1:{PORT}/v1/jobs/{job['id']}/artifacts").json()["data"]
    validation = next(a for a in arts if a["kind"] == "validation_data")
    data = httpx.get(f"http://127.0.0.1:{PORT}/v1/artifacts/{validation['id']}/content").content
    (clone / "validation.npz").write_bytes(data)
    val = np.load(clone / "validation.npz")
    session = onnxruntime.InferenceSession(str(clone / "student.onnx"))
    name = session.get_inputs()[0].name
    pred = session.run(None, {name: val["x_val"].astype(np.float32)})[0].argmax(1)
    accuracy = float((pred == val["y_val"]).mean())
    assert accuracy == pytest.approx(job["result"]["student"]["accuracy"], abs=0.01)


def test_make_serve_takes_the_port_and_host_from_the_command_line(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than pyproject.toml: no install step
    # Run as from a shell: under `make test` the parent make's variables would make this one
    # announce the directories it enters.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    run = subprocess.run(
        ["make", "--no-print-directory", "-n", "serve", "PORT=8010", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    assert run.stdout.strip().splitlines() == [
        f"{venv}/bin/distill serve --host 127.0.0.1 --port 8010"
    ]
