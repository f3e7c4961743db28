"""`distill run SPEC --out DIR`: one job on this machine, no service."""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from cli.app import app
from cli.render import render_result
from client.progress import JobProgress
from core.distill.types import ModelFile, ProgressFn
from core.errors import DistillError, InvalidSpec, job_error
from core.spec import JobSpec, parse_spec

EXIT_FAILED = 1
EXIT_BAD_SPEC = 2


def load_spec_file(path: Path) -> JobSpec:
    """Read a YAML or JSON spec file; InvalidSpec naming the field when it is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidSpec(f"cannot read the spec file {path}: {exc.strerror}", field="") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        first = str(exc).strip().splitlines()[0]
        raise InvalidSpec(f"{path} is not valid {kind}: {first}", field="") from None
    spec = parse_spec(data)
    if spec.dataset_id is not None:
        raise InvalidSpec(
            "dataset_id names an uploaded dataset; a local run takes dataset_path: FILE",
            field="dataset_id",
        )
    for field, ref in spec.model_refs():
        if ref.model_id is not None:
            raise InvalidSpec(
                "model_id names an uploaded model; a local run takes path: FILE instead",
                field=f"{field}.model_id",
            )
    return spec


def resolve(base: Path, path: str) -> Path:
    """A spec path: absolute as is, relative to the spec file's folder otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


def model_files(spec: JobSpec, base: Path) -> dict[str, ModelFile]:
    """Open each model file of the spec in the sandbox to learn its format (and architecture).

    The files are the user's own and this process runs them next: caged when a cage can be
    built here, uncaged otherwise (nothing to refuse a user their own model for).
    """
    from core.distill import cage
    from core.distill.inspect import inspect_model_file

    isolation = cage.isolation("on")
    if not isolation.caged:
        isolation = cage.isolation("off")
    files: dict[str, ModelFile] = {}
    for field, ref in spec.model_refs():
        assert ref.path is not None
        if ref.path in files:
            continue
        path = resolve(base, ref.path)
        if not path.is_file():
            raise InvalidSpec(f"'{field}.path': no such file {path}", field=f"{field}.path")
        info = inspect_model_file(path, format=ref.format, arch=ref.arch, isolation=isolation)
        files[ref.path] = ModelFile(
            path=path,
            format=info.format,
            arch=info.arch,
            arch_config=getattr(info, "arch_config", None),
        )
    return files


@dataclass
class LocalJob:
    """A checked spec file with its files found: ready to run."""

    spec: JobSpec
    dataset: Path
    models: dict[str, ModelFile]


def prepare(spec_path: Path) -> LocalJob:
    """Load and check a spec file; find its dataset and open its models in the sandbox."""
    spec = load_spec_file(spec_path)
    base = spec_path.resolve().parent
    assert spec.dataset_path is not None
    dataset = resolve(base, spec.dataset_path)
    if not dataset.is_file():
        raise InvalidSpec(f"'dataset_path': no such file {dataset}", field="dataset_path")
    return LocalJob(spec=spec, dataset=dataset, models=model_files(spec, base))


def execute(
    job: LocalJob,
    out: Path,
    work_dir: Path | None,
    *,
    dataset_options: dict[str, Any],
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """Run a prepared job into ``out``; its result."""
    from core.distill.pipeline import run_job

    # Without --work-dir, checkpoints go beside OUT and are kept only while they can resume.
    work = work_dir or out.parent / f".{out.name}.work"
    outcome = run_job(
        job.spec,
        models=job.models,
        dataset=job.dataset,
        dataset_options=dataset_options,
        out_dir=out,
        work_dir=work,
        progress=progress,
        should_stop=lambda: False,
    )
    if work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    for artifact in outcome.artifacts:
        if artifact.kind == "student_hf":  # also unzipped, ready for from_pretrained
            folder = out / "student_hf"
            shutil.rmtree(folder, ignore_errors=True)
            with zipfile.ZipFile(artifact.path) as zf:
                zf.extractall(folder)
    return outcome.result


def _message(exc: DistillError) -> str:
    field = exc.details.get("field") if isinstance(exc, InvalidSpec) else None
    where = f" at '{field}'" if field and f"{field}" not in exc.message else ""
    return f"[red]error[/red] ({exc.code}){where}: {exc.message}"


@app.command("run")
def run(
    spec: Annotated[Path, typer.Argument(help="Job spec, YAML or JSON (see the API docs).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the artifacts.")],
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Checkpoints; a re-run with the same folder resumes. Default: beside OUT."
        ),
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="CSV/Parquet datasets: the column holding the labels.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the result as JSON instead of tables.")
    ] = False,
) -> None:
    """Distil a student from a teacher on this machine and write its artifacts into OUT."""
    # torch's deprecation notices (torch.export, TorchScript) say nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    console = Console()
    errors = Console(stderr=True)
    options = {"label_column": label_column} if label_column else {}
    try:
        job = prepare(spec)
        if as_json:
            result = execute(job, out, work_dir, dataset_options=options, progress=None)
        else:
            with JobProgress(errors) as progress:
                result = execute(job, out, work_dir, dataset_options=options, progress=progress)
    except InvalidSpec as exc:
        errors.print(_message(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_SPEC) from None
    except DistillError as exc:
        errors.print(_message(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        errors.print("[red]cancelled[/red]: nothing was written")
        raise typer.Exit(130) from None
    except Exception as exc:
        if os.environ.get("DISTILL_DEBUG") == "1":
            raise
        error = job_error(exc)
        errors.print(
            f"[red]error[/red] ({error['code']}): {error['message']} "
            "(set DISTILL_DEBUG=1 for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console.print(render_result(result))
    console.print(f"artifacts in {out}")
