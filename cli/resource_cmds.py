"""`distill models|datasets|jobs …`: the service's resources from the command line (the SDK).

Options, errors and exit codes as in cli/remote.py; ``jobs logs --json`` prints one JSON event
per line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table

from cli.app import app
from cli.listing import (
    After,
    All,
    Limit,
    add_list_command,
    emit_page,
    fetch_page,
    report_deleted,
    show_item,
)
from cli.remote import (
    EXIT_BAD_INPUT,
    ApiKey,
    AsJson,
    Url,
    connect,
    err,
    errors,
    fail,
    out,
    print_json,
)
from client.sdk import Client, Event, Job, sha256_file

models_app = typer.Typer(no_args_is_help=True, help="Uploaded models (teachers, students).")
datasets_app = typer.Typer(no_args_is_help=True, help="Uploaded transfer sets.")
jobs_app = typer.Typer(no_args_is_help=True, help="Distillation jobs on the service.")
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")


def _shape(signature: dict[str, Any], key: str) -> str:
    shapes = [t.get("shape") for t in (signature or {}).get(key, [])]
    return ", ".join(str(["N" if d is None else d for d in s]) for s in shapes if s is not None)


# --- models -------------------------------------------------------------------------------------


def model_table(models: list[Any]) -> Table:
    table = Table("id", "name", "format", "parameters", "input", "output", "created")
    for m in models:
        params = f"{m.parameters:,}" if m.parameters is not None else "–"
        sig = m.signature or {}
        fmt = m.format
        if sig.get("hf"):  # a Hugging Face model: its class says more than its input shapes
            fmt = f"hf ({sig['hf'].get('architecture')})"
        table.add_row(
            m.id, m.name, fmt, params, _shape(sig, "inputs"), _shape(sig, "outputs"),
            m.created_at[:19],
        )  # fmt: skip
    return table


@models_app.command("upload")
def models_upload(
    path: Annotated[
        Path,
        typer.Argument(
            help="Model file (.pt2, .onnx, .pt, .safetensors), or a Hugging Face "
            "save_pretrained folder (zipped on the way) or its .zip."
        ),
    ],
    name: Annotated[str | None, typer.Option(help="Name (default: the file's stem).")] = None,
    format: Annotated[str | None, typer.Option(help="Format (detected when absent).")] = None,
    arch: Annotated[str | None, typer.Option(help="safetensors: built-in architecture.")] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="TorchScript: one sample's shape, e.g. '[1, 8, 8]'.")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a model; the service opens it in a sandbox and records its signature."""
    shape = _json_list(input_shape, "--input-shape") if input_shape else None
    with errors(), connect(url, api_key) as client:
        model = client.models.upload(path, name=name, format=format, arch=arch, input_shape=shape)
    if as_json:
        print_json(model.to_dict())
        return
    out.print(model_table([model]))


def _json_list(text: str, option: str) -> list[int]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        fail("invalid_request", f"{option} takes a JSON list such as '[1, 8, 8]'", EXIT_BAD_INPUT)
    return value


add_list_command(models_app, "models", model_table, "models")


@models_app.command("show")
def models_show(
    model_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Show one model."""
    with errors(), connect(url, api_key) as client:
        show_item(client.models.get(model_id), as_json)


@models_app.command("delete")
def models_delete(
    model_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Delete a model (refused while a queued or running job uses it)."""
    with errors(), connect(url, api_key) as client:
        report_deleted(client.models.delete(model_id), as_json)


# --- datasets -----------------------------------------------------------------------------------


def dataset_table(datasets: list[Any]) -> Table:
    table = Table("id", "name", "format", "samples", "x", "labels", "classes", "created")
    for d in datasets:
        table.add_row(
            d.id, d.name, d.format, f"{d.n_samples:,}",
            str(["N" if s is None else s for s in d.x_shape]), "yes" if d.has_labels else "no",
            str(d.n_classes if d.n_classes is not None else "–"), d.created_at[:19],
        )  # fmt: skip
    return table


@datasets_app.command("upload")
def datasets_upload(
    path: Annotated[Path, typer.Argument(help="Transfer set: .npz .csv .parquet .zip .jsonl")],
    name: Annotated[str | None, typer.Option(help="Name (default: the file's stem).")] = None,
    label_column: Annotated[
        str | None, typer.Option(help="CSV/Parquet: the column holding the labels.")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a transfer set; the service checks it and records its shape."""
    with errors(), connect(url, api_key) as client:
        dataset = client.datasets.upload(path, name=name, label_column=label_column)
    print_json(dataset.to_dict()) if as_json else out.print(dataset_table([dataset]))


add_list_command(datasets_app, "datasets", dataset_table, "datasets")


@datasets_app.command("show")
def datasets_show(
    dataset_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Show one dataset."""
    with errors(), connect(url, api_key) as client:
        show_item(client.datasets.get(dataset_id), as_json)


@datasets_app.command("delete")
def datasets_delete(
    dataset_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    with errors(), connect(url, api_key) as client:
        report_deleted(client.datasets.delete(dataset_id), as_json)


# --- jobs ---------------------------------------------------------------------------------------


def read_spec(path: Path) -> dict[str, Any]:
    """A YAML or JSON spec file as a dict (error[invalid_spec] when it is not one)."""
    try:
        text = path.read_text()
    except OSError as exc:
        fail("invalid_spec", f"cannot read the spec file {path}: {exc.strerror}", EXIT_BAD_INPUT)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0]
        fail("invalid_spec", f"{path} is not valid YAML/JSON: {first}", EXIT_BAD_INPUT)
    if not isinstance(data, dict):
        fail("invalid_spec", f"{path} must hold a mapping (the job spec)", EXIT_BAD_INPUT)
    return data


def upload_local_files(client: Client, spec: dict[str, Any], base: Path) -> dict[str, Any]:
    """Replace ``{"path": FILE}`` model refs and ``dataset_path`` with uploaded ids.

    Relative paths are relative to ``base`` (the spec file's folder); each file is uploaded once,
    and not at all when the service already holds an upload of it (same sha256 and name): a
    retried ``jobs submit`` does not send the files again.
    """
    spec = json.loads(json.dumps(spec))
    uploaded: dict[Path, str] = {}

    def model_ref(ref: Any, field: str) -> None:
        if not isinstance(ref, dict) or ref.get("path") is None:
            return
        path = _local(base, ref.pop("path"), f"{field}.path")
        options = {k: ref.pop(k, None) for k in ("format", "arch", "input_shape")}
        if path not in uploaded:
            # Options change what the upload records; only a plain upload is reused.
            plain = all(v is None for v in options.values())
            found = _uploaded_before(client.models, path) if plain else None
            uploaded[path] = found or client.models.upload(path, **options).id
        ref["model_id"] = uploaded[path]

    model_ref(spec.get("teacher"), "teacher")
    for i, ref in enumerate(spec.get("teachers") or []):
        model_ref(ref, f"teachers.{i}")
    model_ref(spec.get("student"), "student")
    for i, stage in enumerate(spec.get("stages") or []):
        if isinstance(stage, dict):
            model_ref(stage.get("student"), f"stages.{i}.student")
    if spec.get("dataset_path") is not None:
        path = _local(base, spec.pop("dataset_path"), "dataset_path")
        found = _uploaded_before(client.datasets, path)
        spec["dataset_id"] = found or client.datasets.upload(path).id
    return spec


def _uploaded_before(section: Any, path: Path) -> str | None:
    """The id of an upload of this very file under its default name, if the service has one;
    otherwise None, after saying that the file is being uploaded."""
    digest = sha256_file(path)
    for item in section.list(limit=100, sha256=digest).data:
        if item.sha256 == digest and item.name == path.stem:
            err.print(f"{path} is already uploaded as {item.id}; using it")
            return str(item.id)
    err.print(f"uploading {path} …")
    return None


def _local(base: Path, value: Any, field: str) -> Path:
    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        fail("invalid_spec", f"'{field}': no such file {path}", EXIT_BAD_INPUT)
    return path.resolve()


def job_table(jobs: list[Job]) -> Table:
    table = Table("id", "name", "status", "progress", "student accuracy", "created")
    for j in jobs:
        fraction = float((j.progress or {}).get("fraction") or 0.0)
        student = (j.result or {}).get("student") or {}
        acc = student.get("accuracy")
        table.add_row(
            j.id, j.name or "", j.status, f"{100 * fraction:.0f} %",
            f"{100 * acc:.2f} %" if acc is not None else "–", j.created_at[:19],
        )  # fmt: skip
    return table


def finish(job: Job, as_json: bool) -> None:
    """Print a terminal job (result tables, or its error) and exit 1 unless it succeeded."""
    from cli.render import render_result

    if as_json:
        print_json(job.to_dict())
    elif job.status == "succeeded" and job.result:
        out.print(render_result(job.result))
    if job.status != "succeeded":
        error = job.error or {}
        fail(error.get("code") or job.status, error.get("message") or f"job {job.id} {job.status}")


@jobs_app.command("submit")
def jobs_submit(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML or JSON); see docs/SPEC.md.")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with the same key returns the same job.")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Submit a job; local files (teacher path:, dataset_path:) are uploaded first."""
    body = read_spec(spec)
    with errors(), connect(url, api_key) as client:
        body = upload_local_files(client, body, spec.resolve().parent)
        job = client.jobs.create(body, idempotency_key=idempotency_key)
        if not wait:
            if as_json:
                print_json(job.to_dict())
            else:
                out.print(f"submitted {job.id} ({job.status})")
            return
        if not as_json:
            err.print(f"submitted {job.id}")
        job = job.wait(progress=not as_json)
    finish(job, as_json)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs with this status.")] = None,
    limit: Limit = 20,
    after: After = None,
    all_: All = False,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List your jobs, newest first."""
    with errors(), connect(url, api_key) as client:
        items, more = fetch_page(client.jobs, limit=limit, after=after, all_=all_, status=status)
    emit_page(items, more, job_table(items), as_json)


@jobs_app.command("show")
def jobs_show(
    job_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Show a job: status, progress, latest metrics, and the result or error."""
    from cli.render import render_result

    with errors(), connect(url, api_key) as client:
        job = client.jobs.get(job_id)
    if as_json:
        print_json(job.to_dict())
        return
    out.print(job_table([job]))
    if job.metrics:
        out.print("metrics: " + _metrics_text(job.metrics))
    if job.error:
        out.print(f"[red]error[/red]\\[{job.error.get('code')}]: {job.error.get('message')}")
    if job.result:
        out.print(render_result(job.result))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Cancel a job (idempotent)."""
    with errors(), connect(url, api_key) as client:
        job = client.jobs.cancel(job_id)
    print_json(job.to_dict()) if as_json else out.print(f"{job.id}: {job.status}")


def _metrics_text(data: dict[str, Any]) -> str:
    parts = []
    for key, value in data.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def event_line(event: Event) -> str:
    """One event as a line of text."""
    data = event.data
    if event.type == "status":
        text = f"status {data.get('status')}"
        if data.get("error"):
            text += f" — {data['error'].get('code')}: {data['error'].get('message')}"
    elif event.type == "log":
        text = str(data.get("message", ""))
    else:
        text = _metrics_text(data)
    return f"{event.seq:>4}  {event.at[:19]}  {event.type:<8} {text}"


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream live until the end.")] = (
        False
    ),
    after: Annotated[int, typer.Option(min=0, help="Only events after this seq.")] = 0,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """A job's events (state changes, every epoch's metrics, log lines); --follow streams them."""
    from client.progress import ProgressFeed

    with errors(), connect(url, api_key) as client:
        if not follow:
            for event in client.jobs.iter_events(job_id, after=after):
                typer.echo(json.dumps(event.to_dict()) if as_json else event_line(event))
            return
        with ProgressFeed(enabled=not as_json, console=err) as feed:
            feed.job(client.jobs.get(job_id))
            for event in client.jobs.stream_events(job_id, after=after):
                if as_json:
                    typer.echo(json.dumps(event.to_dict()))
                    continue
                out.print(event_line(event), markup=False, highlight=False)
                feed.event(event)
                if event.type in ("metrics", "status"):
                    feed.job(client.jobs.get(job_id))
        job = client.jobs.get(job_id)
    if as_json:
        if job.status != "succeeded":
            error = job.error or {}
            fail(error.get("code") or job.status, error.get("message") or f"job {job.status}")
        return
    finish(job, as_json=False)


@jobs_app.command("download")
def jobs_download(
    job_id: str,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the files.")],
    kind: Annotated[
        list[str] | None, typer.Option(help="Only these kinds (e.g. student_onnx); repeatable.")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Download a job's artifacts (checked against their sha256; partial files are resumed)."""
    from cli.render import human_bytes

    files = []
    with errors(), connect(url, api_key) as client:
        artifacts = client.jobs.artifacts(job_id)
        if kind:
            artifacts = [a for a in artifacts if a.kind in kind]
        if not artifacts:
            job = client.jobs.get(job_id)
            fail("no_artifacts", f"job {job_id} is {job.status} and has no matching artifacts")
        out_dir.mkdir(parents=True, exist_ok=True)
        for artifact in artifacts:
            path = client.artifacts.download(artifact.id, out_dir / artifact.name)
            files.append({**artifact.to_dict(), "path": str(path)})
            if not as_json:
                out.print(f"{path}  ({human_bytes(artifact.size_bytes)}, {artifact.kind})")
    if as_json:
        print_json(files)
