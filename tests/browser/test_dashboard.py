"""The dashboard in headless Chromium against a real API and Celery worker (auth on).

In order, as a user would: the shell loads without a key and asks for one; a teacher and the
digits go up through the upload forms; the job form shows its defaults and puts a 422 next to
the field; a job submitted through the form draws a growing curve live, ends with the teacher /
student / baseline table and hands out the student byte for byte; a running job is cancelled
from its page. Screenshots are saved (DISTILL_SCREENSHOT_DIR=docs/img refreshes the README's).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cli.digits import DigitsCNN, train_classifier
from core.spec import TrainingSpec
from tests.browser.conftest import Service, screenshot, with_key
from tests.core.model_files import save_exported_program, save_pickled_model
from tests.service.helpers import migrate, service_env, start_api

pytestmark = [pytest.mark.service, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def files(
    digits: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """A narrow CNN teacher (.pt2), the same model pickled, and the digits (.npz) where only
    10 training images per class keep their label (the others are -1: the transfer set)."""
    folder = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    teacher = train_classifier(DigitsCNN(width=8), digits["x_train"], digits["y_train"], epochs=12)
    example = torch.from_numpy(digits["x_train"][:2])
    data = folder / "digits.npz"
    y = np.full_like(digits["y_train"], -1)
    for label in range(10):
        keep = np.flatnonzero(digits["y_train"] == label)[:10]
        y[keep] = label
    np.savez(
        data,
        x=digits["x_train"],
        y=y,
        x_val=digits["x_test"],
        y_val=digits["y_test"],
    )
    return {
        "teacher": save_exported_program(teacher, folder / "teacher.pt2", example),
        "pickle": save_pickled_model(teacher, folder / "pickled.pt"),
        "dataset": data,
    }


@pytest.fixture(scope="module")
def uploaded(service: Service) -> dict[str, Any]:
    """What the upload test put on the server (filled in by it; later tests need it)."""
    return {}


def _job_status(service: Service, job_id: str) -> dict[str, Any]:
    return service.http.get(f"/v1/jobs/{job_id}").json()


def test_shell_loads_without_key_and_asks_for_one(page: Any, service: Service) -> None:
    shell = service.http.get("/", headers={"Authorization": ""})
    assert shell.status_code == 200 and shell.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in shell.headers["content-security-policy"]
    # The JSON API and its docs are untouched, and still need the key.
    anonymous = service.http.get("/v1/jobs", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert service.http.get("/docs").status_code == 200
    assert "/" not in service.http.get("/openapi.json").json()["paths"]

    page.goto("/")
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    assert "missing API key" in notice.inner_text()
    assert page.locator("#key-form").is_visible()  # auth is on: the key has a field
    page.fill("#api-key", service.key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#jobs-table[data-loaded=true]")
    assert notice.is_hidden()
    assert page.evaluate("localStorage.getItem('distill.apiKey')") == service.key
    page.reload()  # the key survives a reload
    page.wait_for_selector("#jobs-table[data-loaded=true]")


def test_upload_forms(
    page: Any, service: Service, files: dict[str, Path], uploaded: dict[str, Any]
) -> None:
    with_key(page, service.key).goto("/uploads")

    form = page.locator("#model-form")
    form.locator("input[name=file]").set_input_files(str(files["pickle"]))
    form.locator("button[type=submit]").click()
    refused = page.locator("#model-form .field-error:visible, #model-form .form-error:visible")
    refused.first.wait_for()
    assert "unpickl" in refused.first.inner_text() or "pickle" in refused.first.inner_text()

    form.locator("input[name=file]").set_input_files(str(files["teacher"]))
    form.locator("input[name=name]").fill("digits-cnn")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#model-form [role=status]:has-text('Uploaded')", timeout=60_000)

    form = page.locator("#dataset-form")
    form.locator("input[name=file]").set_input_files(str(files["dataset"]))
    form.locator("input[name=name]").fill("digits")
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#dataset-form [role=status]:has-text('Uploaded')", timeout=60_000)

    models = service.http.get("/v1/models").json()["data"]
    datasets = service.http.get("/v1/datasets").json()["data"]
    assert [m["name"] for m in models] == ["digits-cnn"]  # the pickle was not stored
    assert [d["name"] for d in datasets] == ["digits"]
    assert models[0]["format"] == "exported_program"
    assert datasets[0]["n_samples"] == len(np.load(files["dataset"])["x"])
    for table, item in (("#models-table", models[0]), ("#datasets-table", datasets[0])):
        row = page.locator(f"{table} tr[data-id='{item['id']}']")
        assert item["name"] in row.inner_text()
    uploaded.update(model=models[0], dataset=datasets[0])
    screenshot(page, "dashboard-uploads.png")


def test_job_form_defaults_and_field_error(
    page: Any, service: Service, uploaded: dict[str, Any]
) -> None:
    if not uploaded:
        pytest.skip("needs the uploads of test_upload_forms")
    with_key(page, service.key).goto("/jobs/new")
    form = page.locator("#job-form")
    form.wait_for()
    # What the service chooses from the data is left empty, marked "auto".
    for name in ("training.epochs", "training.batch_size", "training.lr", "student.width"):
        assert form.locator(f"[name='{name}']").input_value() == "", name
        assert form.locator(f"[name='{name}']").get_attribute("placeholder") == "auto", name
    defaults = TrainingSpec()
    assert float(form.locator("[name='training.max_minutes']").input_value()) == (
        defaults.max_minutes
    )
    assert form.locator("[name='distillation.method']").input_value() == "kd"
    assert form.locator("[name='teacher.model_id']").input_value() == uploaded["model"]["id"]
    assert form.locator("[name='dataset_id']").input_value() == uploaded["dataset"]["id"]
    screenshot(page, "dashboard-new-job.png")

    before = len(service.http.get("/v1/jobs").json()["data"])
    form.locator("[name='training.epochs']").fill("0")
    form.locator("#submit-job").click()
    error = page.locator("[data-error-for='training.epochs']")
    error.wait_for(state="visible")
    assert "training.epochs" in error.inner_text()
    assert "greater than or equal to 1" in error.inner_text()
    assert form.locator("[name='training.epochs']").get_attribute("aria-invalid") == "true"
    assert len(service.http.get("/v1/jobs").json()["data"]) == before
    assert page.url.endswith("/jobs/new")


def test_job_live_curve_result_and_download(
    page: Any, service: Service, uploaded: dict[str, Any], tmp_path: Path
) -> None:
    if not uploaded:
        pytest.skip("needs the uploads of test_upload_forms")
    with_key(page, service.key).goto("/jobs/new")
    form = page.locator("#job-form")
    form.locator("[name=name]").fill("digits-cnn-to-mlp")
    form.locator("[name='student.preset']").select_option("mlp")
    form.locator("[name='student.width']").fill("64")
    form.locator("[name='student.depth']").fill("1")
    form.locator("[name='training.epochs']").fill("6")
    form.locator("[name='training.batch_size']").fill("32")
    form.locator("[name='training.lr']").fill("0.003")
    form.locator("#submit-job").click()
    page.wait_for_url("**/jobs/job_*")
    job_id = page.url.rsplit("/", 1)[1]

    # Sample the plotted points while the job runs: the curve must grow on the open page.
    seen: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        points = int(page.locator("#loss-chart").get_attribute("data-points") or 0)
        if not seen or points != seen[-1]:
            seen.append(points)
        if _job_status(service, job_id)["status"] in TERMINAL:
            break
        time.sleep(0.1)
    job = _job_status(service, job_id)
    assert job["status"] == "succeeded", f"{job['error']} {seen}\n{service.log_tail()}"
    page.wait_for_selector("#result-table")

    events = service.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()
    # Every epoch is a point; the last metrics event (the delivered student's figures) is not.
    metrics = [e for e in events["data"] if e["type"] == "metrics" and "epoch" in e["data"]]
    assert len(metrics) >= 6  # distilled student, plus the baseline's epochs
    assert page.locator("#loss-chart").get_attribute("data-points") == str(len(metrics))
    # Curves against optimizer steps: the baseline runs more epochs over its 100 labels, but
    # as many steps as the student, so both curves end at the same x.
    assert page.locator("#loss-chart").get_attribute("data-x-axis") == "step"
    assert page.locator("#loss-chart").get_attribute("data-y-scale") == "log"
    last = {}
    for e in metrics:
        last[e["data"]["label"]] = e["data"]["step"]
    assert len(set(last.values())) == 1, last
    assert seen == sorted(seen), seen
    growing = [n for n in seen if 0 < n < len(metrics)]
    assert len(growing) >= 2, f"the curve did not grow while the page watched: {seen}"
    assert int(page.locator("#loss-chart").get_attribute("data-series")) >= 4  # 2 labels × 2
    assert page.locator("#loss-chart canvas").count() == 1
    assert page.locator("#accuracy-chart canvas").count() == 1

    result = job["result"]
    table = page.locator("#result-table")
    for column in ("teacher", "student", "baseline"):
        assert table.locator(f"th[data-column={column}]").count() == 1
    student_accuracy = table.locator("tr[data-metric=accuracy] td[data-column=student]")
    assert student_accuracy.inner_text() == f"{100 * result['student']['accuracy']:.1f}%"
    assert page.locator("#job-status").inner_text() == "succeeded"
    assert page.locator("#cancel").is_hidden()

    artifacts = service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    onnx = next(a for a in artifacts if a["kind"] == "student_onnx")
    with page.expect_download() as info:
        page.click("#artifacts button[data-kind=student_onnx]")
    download = info.value
    assert download.suggested_filename == onnx["name"]
    saved = tmp_path / onnx["name"]
    download.save_as(saved)
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert digest == onnx["sha256"]
    assert (
        digest
        == hashlib.sha256(
            service.http.get(f"/v1/artifacts/{onnx['id']}/content").content
        ).hexdigest()
    )
    screenshot(page, "dashboard-job.png")

    page.goto("/")
    row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
    row.wait_for()
    assert row.get_attribute("data-status") == "succeeded"
    assert row.locator("td.accuracy").inner_text() == f"{100 * result['student']['accuracy']:.1f}%"
    assert "→" in row.locator("td.sizes").inner_text()
    screenshot(page, "dashboard-jobs.png")


def test_a_baseline_that_beats_the_student_is_a_visible_warning(
    page: Any, service: Service, digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A teacher that learned the wrong class for every digit, all labels given: the job
    succeeds, and its page says plainly that the labels-only baseline is better and offers the
    baseline's files; the jobs table marks it too."""
    torch.manual_seed(0)
    wrong = (digits["y_train"] + 3) % 10
    bad = train_classifier(DigitsCNN(width=8), digits["x_train"], wrong, epochs=8)
    teacher = save_exported_program(
        bad, tmp_path / "wrong.pt2", torch.from_numpy(digits["x_train"][:2])
    )
    data = tmp_path / "all-labels.npz"
    np.savez(data, x=digits["x_train"], y=digits["y_train"], x_val=digits["x_test"],
             y_val=digits["y_test"])  # fmt: skip
    with teacher.open("rb") as f:
        model = service.http.post("/v1/models", files={"file": f}, data={"name": "wrong"}).json()
    with data.open("rb") as f:
        dataset = service.http.post("/v1/datasets", files={"file": f}).json()
    spec = {
        "name": "wrong-teacher",
        "teacher": {"model_id": model["id"]},
        "dataset_id": dataset["id"],
        "student": {"preset": "mlp", "width": 32, "depth": 1},
        "training": {"epochs": 4, "batch_size": 32, "lr": 0.01},
        "compression": {"prune": {"amount": 0.25, "structured": True}},
        "export": ["onnx"],
    }
    r = service.http.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 300
    while _job_status(service, job_id)["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    job = _job_status(service, job_id)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.log_tail()}"
    assert job["result"]["verdict"] == "baseline_better"

    with_key(page, service.key).goto(f"/jobs/{job_id}")
    verdict = page.locator("#verdict")
    verdict.wait_for(state="visible")
    assert verdict.get_attribute("data-verdict") == "baseline_better"
    assert verdict.get_attribute("role") == "alert"
    text = verdict.inner_text()
    assert text.startswith("Warning:") and "baseline is better" in text
    assert f"{100 * job['result']['baseline']['accuracy']:.1f}%" in text
    page.locator("#artifacts button[data-kind=baseline_onnx]").wait_for()
    assert "smaller in parameters" in page.locator("#summary").inner_text()
    # The compression steps, before and after.
    pruned = page.locator("#compression-table tr[data-step=prune][data-metric=parameters]")
    step = job["result"]["compression"][0]
    assert step["after"]["parameters"] < step["before"]["parameters"]
    assert pruned.locator("td.num").all_inner_texts() == [
        fmt_count(step["before"]["parameters"]),
        fmt_count(step["after"]["parameters"]),
    ]
    page.locator("details summary").click()
    assert page.locator("#log li.warning").count() == 1
    screenshot(page, "dashboard-baseline-better.png")

    page.goto("/")
    mark = page.locator(f"#jobs-table tr[data-job-id='{job_id}'] .verdict-mark")
    mark.wait_for()
    assert "baseline better" in mark.inner_text()


def fmt_count(n: int) -> str:
    """The dashboard's fmtCount: 2400 → '2.4k'."""
    if n >= 1e6:
        return f"{n / 1e6:.{0 if n >= 1e7 else 1}f}M"
    if n >= 1e3:
        return f"{n / 1e3:.{0 if n >= 1e4 else 1}f}k"
    return str(n)


def test_cancel_button(page: Any, service: Service, uploaded: dict[str, Any]) -> None:
    if not uploaded:
        pytest.skip("needs the uploads of test_upload_forms")
    spec = {
        "teacher": {"model_id": uploaded["model"]["id"]},
        "dataset_id": uploaded["dataset"]["id"],
        "student": {"preset": "mlp", "width": 64},
        "training": {"epochs": 500, "batch_size": 16, "baseline": False},
    }
    r = service.http.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    with_key(page, service.key).goto(f"/jobs/{job_id}")
    page.wait_for_selector("#job-status [data-status=running]", timeout=60_000)
    page.click("#cancel")
    page.wait_for_selector("#job-status [data-status=cancelled]", timeout=60_000)
    assert _job_status(service, job_id)["status"] == "cancelled"
    assert page.locator("#cancel").is_hidden()
    assert service.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []


def test_unnamed_jobs_are_called_after_their_teacher_and_student(
    page: Any, service: Service, uploaded: dict[str, Any]
) -> None:
    if not uploaded:
        pytest.skip("needs the uploads of test_upload_forms")
    spec = {
        "teacher": {"model_id": uploaded["model"]["id"]},
        "dataset_id": uploaded["dataset"]["id"],
        "student": {"preset": "mlp", "width": 48, "depth": 1},
        "training": {"epochs": 500, "baseline": False},
    }
    job_id = service.http.post("/v1/jobs", json=spec).json()["id"]
    service.http.post(f"/v1/jobs/{job_id}/cancel")
    with_key(page, service.key).goto("/")
    row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
    row.wait_for()
    teacher = uploaded["model"]["name"]
    assert row.locator("a.job-title").inner_text() == f"{teacher} → mlp 48×1"
    assert job_id in row.locator("td").first.inner_text()  # the id is still there, below


def test_with_auth_off_there_is_no_key_field(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("auth-off")
    database = f"sqlite:///{tmp / 'distill.db'}"
    migrate(database)
    env = service_env(data_dir=str(tmp / "data"), database_url=database, auth="off")
    api, base = start_api(env, tmp)
    context = browser.new_context(base_url=base)
    try:
        page = context.new_page()
        page.goto("/")
        page.wait_for_selector("#jobs-table[data-loaded=true]")
        page.wait_for_function("document.getElementById('key-form').hidden")
        assert page.locator("#key-form").is_hidden()
        assert page.locator("#notice").is_hidden()
    finally:
        context.close()
        api.stop()
