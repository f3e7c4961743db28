"""`distill models|datasets|jobs …` against the running service (API + worker, auth on)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner, Result

from cli.app import app
from client.sdk import Job
from tests.client.conftest import Service, tiny_spec
from tests.service.helpers import ROOT

pytestmark = [pytest.mark.service, pytest.mark.slow]


def distill(service: Service, *args: str) -> Result:
    env = {"DISTILL_URL": service.url, "DISTILL_API_KEY": service.key, "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_models_and_datasets(service: Service, uploaded: dict[str, Any]) -> None:
    r = distill(service, "models", "upload", str(uploaded["teacher_path"]), "--name", "cli-cnn")
    assert r.exit_code == 0, r.output
    assert "cli-cnn" in r.stdout and "exported_program" in r.stdout
    listed = json.loads(distill(service, "models", "list", "--json").stdout)
    model_id = next(m["id"] for m in listed["data"] if m["name"] == "cli-cnn")
    shown = json.loads(distill(service, "models", "show", model_id, "--json").stdout)
    assert shown["id"] == model_id and shown["signature"]["outputs"][0]["shape"] == [None, 10]
    assert distill(service, "models", "delete", model_id).stdout.strip() == f"deleted {model_id}"
    gone = distill(service, "models", "show", model_id)
    assert gone.exit_code == 1
    assert gone.stderr.startswith("error[not_found]: ") and model_id in gone.stderr

    r = distill(service, "datasets", "upload", str(uploaded["data_path"]), "--json")
    dataset = json.loads(r.stdout)
    assert dataset["n_samples"] == 300 and dataset["id"].startswith("ds_")
    table = distill(service, "datasets", "list", "--all").stdout
    assert dataset["id"] in table and uploaded["dataset"].id in table
    assert json.loads(distill(service, "datasets", "show", dataset["id"], "--json").stdout) == {
        **dataset
    }
    assert json.loads(distill(service, "datasets", "delete", dataset["id"], "--json").stdout)[
        "deleted"
    ]


def test_submit_wait_with_local_files_then_logs_and_download(
    service: Service, uploaded: dict[str, Any], tmp_path: Path
) -> None:
    # Teacher and dataset by local path: uploaded on the fly, relative to the spec's folder.
    spec = tiny_spec("x", "x")
    spec["teacher"] = {"path": "../files/teacher.pt2"}
    del spec["dataset_id"]
    spec["dataset_path"] = str(uploaded["data_path"])
    folder = service.files.parent / "specs"
    r = distill(service, "jobs", "submit", str(write_spec(folder, spec)), "--wait")
    assert r.exit_code == 0, r.output
    assert "Validation results" in r.stdout and "teacher" in r.stdout and "student" in r.stdout
    assert "status: succeeded" in r.stderr
    listed = json.loads(distill(service, "jobs", "list", "--json", "--limit", "1").stdout)
    job = listed["data"][0]
    assert job["status"] == "succeeded" and job["spec"]["teacher"]["model_id"].startswith("mdl_")

    logs = distill(service, "jobs", "logs", job["id"], "--json")
    events = [json.loads(line) for line in logs.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert [m["epoch"] for m in metrics[:-1]] == [1, 2]
    assert metrics[-1]["label"] == "delivered student"  # the job's metrics after success
    assert job["metrics"] == metrics[-1]
    followed = distill(service, "jobs", "logs", job["id"], "--follow")
    assert followed.exit_code == 0, followed.output
    assert "status succeeded" in followed.stdout and "Validation results" in followed.stdout

    r = distill(service, "jobs", "download", job["id"], "--out", str(tmp_path), "--json")
    files = json.loads(r.stdout)
    assert {f["name"] for f in files} >= {"student.pt", "student.safetensors", "report.json"}
    for f in files:
        assert hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest() == f["sha256"]
    shown = distill(service, "jobs", "show", job["id"])
    assert "succeeded" in shown.stdout and "Validation results" in shown.stdout


def test_a_retried_submit_reuses_the_uploads_of_the_same_files(
    service: Service, uploaded: dict[str, Any], tmp_path: Path
) -> None:
    # Files the service has not seen under these names: the first submit uploads them.
    folder = tmp_path / "retry"
    folder.mkdir()
    teacher = folder / "retry-teacher.pt2"
    teacher.write_bytes(uploaded["teacher_path"].read_bytes())
    data = np.load(uploaded["data_path"])
    np.savez(folder / "retry-digits.npz", x=data["x"][:200], y=data["y"][:200])
    spec = tiny_spec("x", "x")
    spec["teacher"] = {"path": teacher.name}
    del spec["dataset_id"]
    spec["dataset_path"] = "retry-digits.npz"
    path = write_spec(folder, spec)

    first = distill(service, "jobs", "submit", str(path), "--json")
    assert first.exit_code == 0, first.output
    assert first.stderr.count("uploading") == 2, first.stderr
    again = distill(service, "jobs", "submit", str(path), "--json")
    assert again.exit_code == 0, again.output
    assert "uploading" not in again.stderr and again.stderr.count("already uploaded") == 2
    one, two = json.loads(first.stdout)["spec"], json.loads(again.stdout)["spec"]
    assert one["teacher"] == two["teacher"] and one["dataset_id"] == two["dataset_id"]
    with service.client() as client:
        digest = hashlib.sha256((folder / "retry-digits.npz").read_bytes()).hexdigest()
        assert [d.id for d in client.datasets.list(sha256=digest).data] == [one["dataset_id"]]
        # The same bytes under another name are another upload (the name is what users see).
        digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
        names = {m.name for m in client.models.list(sha256=digest).data}
        assert names >= {"retry-teacher", "tiny-cnn"}


def test_submit_json_wait(service: Service, uploaded: dict[str, Any], tmp_path: Path) -> None:
    spec = tiny_spec(uploaded["teacher"].id, uploaded["dataset"].id)
    r = distill(service, "jobs", "submit", str(write_spec(tmp_path, spec)), "--wait", "--json")
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["status"] == "succeeded" and job["result"]["student"]["accuracy"] is not None


def test_bad_spec_names_the_field(
    service: Service, uploaded: dict[str, Any], tmp_path: Path
) -> None:
    spec = tiny_spec(uploaded["teacher"].id, uploaded["dataset"].id)
    spec["training"]["lr"] = -1
    r = distill(service, "jobs", "submit", str(write_spec(tmp_path, spec)))
    assert r.exit_code == 2
    assert r.stderr.startswith("error[invalid_spec]: ") and "training.lr" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    spec = tiny_spec(uploaded["teacher"].id, uploaded["dataset"].id)
    spec["teacher"] = {"path": "missing.pt2"}
    r = distill(service, "jobs", "submit", str(write_spec(tmp_path, spec)))
    assert r.exit_code == 2 and "teacher.path" in r.stderr and "missing.pt2" in r.stderr


def test_cancelled_job_exits_1(service: Service, uploaded: dict[str, Any], tmp_path: Path) -> None:
    """`jobs submit --wait` on a job cancelled from elsewhere ends with its error and exit 1."""
    import threading
    import time

    spec = tiny_spec(
        uploaded["teacher"].id, uploaded["dataset"].id, epochs=500, early_stopping_patience=None
    )
    path = write_spec(tmp_path, spec)

    def cancel_when_running() -> None:
        with service.client() as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = list(client.jobs.list(status="running"))
                if running:
                    client.jobs.cancel(running[0].id)
                    return
                time.sleep(0.3)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    r = distill(service, "jobs", "submit", str(path), "--wait")
    canceller.join()
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error[")
    assert "cancelled" in r.stderr
    job_id = json.loads(distill(service, "jobs", "list", "--json", "--limit", "1").stdout)["data"][
        0
    ]["id"]
    assert json.loads(distill(service, "jobs", "cancel", job_id, "--json").stdout)["status"] == (
        "cancelled"
    )


def test_entry_point_exit_code_and_message(service: Service, finished_job: Job) -> None:
    """The installed `distill` command, as a process: JSON out, one-line errors, exit codes."""
    env = {"DISTILL_URL": service.url, "DISTILL_API_KEY": service.key, "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "cli", "jobs", "show", finished_job.id, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["id"] == finished_job.id
    env["DISTILL_API_KEY"] = "dk_not_a_key"
    denied = subprocess.run(
        [sys.executable, "-m", "cli", "jobs", "list"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert denied.returncode == 1
    assert denied.stderr.strip().startswith("error[unauthorized]: ")


def test_a_baseline_that_beats_the_student_is_a_warning_line(
    service: Service, uploaded: dict[str, Any], tmp_path: Path
) -> None:
    """A teacher that learned the wrong class for every digit, all labels given: the job
    succeeds, `submit --wait` and `jobs show` print a warning line, and the baseline's files
    can be downloaded beside the student's."""
    import numpy as np
    import torch

    from cli.digits import DigitsCNN, train_classifier
    from tests.core.model_files import save_exported_program

    data = np.load(uploaded["data_path"])
    torch.manual_seed(0)
    wrong = train_classifier(DigitsCNN(width=4), data["x"], (data["y"] + 3) % 10, epochs=40)
    teacher = save_exported_program(wrong, tmp_path / "wrong.pt2", torch.from_numpy(data["x"][:2]))
    spec = tiny_spec("x", uploaded["dataset"].id, epochs=20, baseline=True, lr=0.01)
    spec["teacher"] = {"path": str(teacher)}
    spec["export"] = ["onnx"]

    r = distill(service, "jobs", "submit", str(write_spec(tmp_path, spec)), "--wait")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, r.stdout
    assert "baseline beat the distilled student" in warnings[0]
    assert "verdict: the labels-only baseline is better" in r.stdout

    job = json.loads(distill(service, "jobs", "list", "--json", "--limit", "1").stdout)["data"][0]
    assert job["status"] == "succeeded" and job["result"]["verdict"] == "baseline_better"
    assert job["metrics"]["label"] == "delivered student"
    assert job["metrics"]["val_accuracy"] == job["result"]["student"]["accuracy"]
    shown = distill(service, "jobs", "show", job["id"])
    assert any(line.startswith("warning: ") for line in shown.stdout.splitlines()), shown.stdout
    logs = distill(service, "jobs", "logs", job["id"]).stdout
    assert "warning: the labels-only baseline beat the distilled student" in logs

    r = distill(service, "jobs", "download", job["id"], "--out", str(tmp_path / "out"), "--json")
    assert {"student.onnx", "baseline.onnx"} <= {f["name"] for f in json.loads(r.stdout)}
