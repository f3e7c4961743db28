"""Listing, showing and deleting the service's resources: what every resource's commands share."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.remote import ApiKey, AsJson, Url, connect, errors, out, print_json
from client.sdk import Resource

Limit = Annotated[int, typer.Option(min=1, max=100, help="Items per page.")]
After = Annotated[str | None, typer.Option(help="Cursor: the last id of the previous page.")]
All = Annotated[bool, typer.Option("--all", help="Every item, across pages.")]


def as_dict(item: Any) -> Any:
    return item.to_dict() if isinstance(item, Resource) else item


def fetch_page(
    section: Any, *, limit: int, after: str | None, all_: bool, **filters: Any
) -> tuple[list[Any], bool]:
    """One page of an SDK section's list (or every page with ``--all``) and whether more
    follow; ``filters`` (such as a job status) go to both."""
    if all_:
        return list(section.iter(**filters)), False
    page = section.list(limit=limit, after=after, **filters)
    return page.data, page.has_more


def emit_page(items: list[Any], has_more: bool, table: Table, as_json: bool) -> None:
    if as_json:
        print_json({"data": [as_dict(i) for i in items], "has_more": has_more})
        return
    out.print(table)
    if has_more:
        out.print("[dim]more: pass --after with the last id, or --all[/dim]")


def add_list_command(
    group: typer.Typer, section: str, table: Callable[[list[Any]], Table], what: str
) -> None:
    """Add ``list`` to ``group``: a page of the SDK's ``client.<section>`` as ``table`` or JSON."""

    @group.command("list", help=f"List your {what}, newest first.")
    def list_items(
        limit: Limit = 20,
        after: After = None,
        all_: All = False,
        url: Url = None,
        api_key: ApiKey = None,
        as_json: AsJson = False,
    ) -> None:
        with errors(), connect(url, api_key) as client:
            items, more = fetch_page(getattr(client, section), limit=limit, after=after, all_=all_)
        emit_page(items, more, table(items), as_json)


def show_item(item: Resource, as_json: bool) -> None:
    """One resource as a two-column table (or JSON)."""
    if as_json:
        print_json(as_dict(item))
        return
    table = Table(show_header=False, box=None)
    for key, value in item.to_dict().items():
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        table.add_row(f"[bold]{key}[/bold]", text)
    out.print(table)


def report_deleted(body: dict[str, Any], as_json: bool) -> None:
    print_json(body) if as_json else out.print(f"deleted {body['id']}")
