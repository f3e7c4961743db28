"""`distill searches …`: budget searches from the command line (the SDK's ``client.searches``).

A search file is a job spec without ``student``, plus ``budget``, ``trials`` and ``space``;
``--max-latency-ms``, ``--max-parameters``, ``--max-size-bytes`` and ``--trials`` set them
from the command line. The result prints as the trials table: the Pareto set marked ``●`` and
the best student within budget ``★``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.app import app
from cli.listing import add_list_command
from cli.remote import ApiKey, AsJson, Url, connect, err, errors, fail, out, print_json
from cli.resource_cmds import read_spec, upload_local_files
from client.sdk import Search

searches_app = typer.Typer(
    no_args_is_help=True, help="Budget searches: the best student for a budget."
)
app.add_typer(searches_app, name="searches")


def _student(student: dict[str, Any]) -> str:
    size = "×".join(str(student[k]) for k in ("width", "depth") if student.get(k) is not None)
    return f"{student.get('preset', '?')} {size}".strip()


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "–"


def trials_table(search: Search) -> Table:
    """Every trial, fastest first: the Pareto set marked ● and the best ★."""
    result = search.result or {}
    table = Table(
        "", "job", "student", "method", "accuracy", "latency ms", "parameters", "size",
        "in budget", "baseline",
        title=f"search {search.id}: {search.status}",
    )  # fmt: skip
    trials = sorted(
        result.get("trials") or [],
        key=lambda t: (t.get("latency_ms") is None, t.get("latency_ms") or 0),
    )
    for t in trials:
        mark = "★" if t.get("best") else ("●" if t.get("pareto") else "")
        accuracy = t.get("accuracy")
        status = t.get("status")
        table.add_row(
            mark,
            t["job_id"],
            _student(t.get("student") or {}),
            t.get("method") or "",
            f"{100 * accuracy:.2f} %" if accuracy is not None else (t.get("error") or status),
            _number(t.get("latency_ms"), ".3f"),
            _number(t.get("parameters"), ","),
            _number(t.get("size_bytes"), ","),
            "yes" if t.get("within_budget") else "no",
            _number(100 * t["baseline_accuracy"], ".2f") + " %"
            if t.get("baseline_accuracy") is not None
            else "–",
        )
    return table


def show(search: Search) -> None:
    """The search: its trials while running, the Pareto table once settled."""
    if search.result is None:
        table = Table("job", "student", "method", "status", title=f"search {search.id}")
        for j in search.jobs:
            table.add_row(
                j["id"], _student(j.get("student") or {}), j.get("method") or "", j["status"]
            )
        out.print(table)
        out.print(f"status: {search.status}")
        return
    out.print(trials_table(search))
    budget = {k: v for k, v in (search.result.get("budget") or {}).items() if v is not None}
    out.print("budget: " + (", ".join(f"{k}={v}" for k, v in budget.items()) or "none"))
    best = search.best_job_id
    if best:
        out.print(f"★ best within budget: {best} (download: distill jobs download {best})")
    else:
        out.print(f"[yellow]no best[/yellow]: {search.result.get('message', '')}")
    out.print("● Pareto set: accuracy up, latency and size down")
    if search.error:
        out.print(f"[red]error[/red]\\[{search.error.get('code')}]: {search.error.get('message')}")


def search_table(searches: list[Search]) -> Table:
    table = Table("id", "name", "status", "trials", "best", "created")
    for s in searches:
        ended = sum(j["status"] in ("succeeded", "failed", "cancelled") for j in s.jobs)
        best = (s.result or {}).get("best_job_id") or "–"
        table.add_row(
            s.id, s.name or "", s.status, f"{ended}/{len(s.jobs)}", best, s.created_at[:19]
        )
    return table


@searches_app.command("submit")
def searches_submit(
    spec: Annotated[
        Path, typer.Argument(help="Base job spec (YAML/JSON) without student; may hold budget.")
    ],
    trials: Annotated[int | None, typer.Option(help="Candidate students to train.")] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option(help="Latency budget: the worker CPU's p50 at batch 1.")
    ] = None,
    max_parameters: Annotated[int | None, typer.Option(help="Parameter budget.")] = None,
    max_size_bytes: Annotated[int | None, typer.Option(help="Size budget (bytes).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait and print the Pareto table.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with the same key returns the same search.")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Start a budget search; local files (teacher path:, dataset_path:) are uploaded first."""
    body = read_spec(spec)
    budget = dict(body.pop("budget", None) or {})
    given = {
        "max_latency_ms": max_latency_ms,
        "max_parameters": max_parameters,
        "max_size_bytes": max_size_bytes,
    }
    budget.update({k: v for k, v in given.items() if v is not None})
    if trials is not None:
        body["trials"] = trials
    with errors(), connect(url, api_key) as client:
        body = upload_local_files(client, body, spec.resolve().parent)
        search = client.searches.create(body, budget=budget, idempotency_key=idempotency_key)
        if not wait:
            if as_json:
                print_json(search.to_dict())
            else:
                out.print(f"submitted {search.id}: {len(search.jobs)} trials ({search.status})")
            return
        if not as_json:
            err.print(f"submitted {search.id}: {len(search.jobs)} trials")
        search = _follow(client, search.id, quiet=as_json)
    _finish(search, as_json)


def _follow(client: Any, search_id: str, quiet: bool) -> Search:
    last = ""
    while not (search := client.searches.get(search_id)).done:
        ended = sum(j["status"] in ("succeeded", "failed", "cancelled") for j in search.jobs)
        line = f"{ended}/{len(search.jobs)} trials ended"
        if not quiet and line != last:
            err.print(line)
            last = line
        time.sleep(1.0)
    return search


def _finish(search: Search, as_json: bool) -> None:
    if as_json:
        print_json(search.to_dict())
    else:
        show(search)
    if search.status != "succeeded":
        error = search.error or {}
        fail(error.get("code") or search.status, error.get("message") or f"search {search.status}")


@searches_app.command("get")
def searches_get(
    search_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Show a search: its trials, the Pareto set (●) and the best within budget (★)."""
    with errors(), connect(url, api_key) as client:
        search = client.searches.get(search_id)
    print_json(search.to_dict()) if as_json else show(search)


add_list_command(searches_app, "searches", search_table, "searches")


@searches_app.command("cancel")
def searches_cancel(
    search_id: str, url: Url = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Cancel a search and its trials still queued or running (idempotent)."""
    with errors(), connect(url, api_key) as client:
        search = client.searches.cancel(search_id)
    print_json(search.to_dict()) if as_json else out.print(f"{search.id}: {search.status}")
