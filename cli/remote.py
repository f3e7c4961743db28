"""What the commands that call the service share: its options, the connection, errors, output.

Configured by ``DISTILL_URL`` / ``DISTILL_API_KEY`` or ``--url`` / ``--api-key``. ``--json`` prints
machine-readable JSON. Errors print one line, ``error[code]: message``, and exit non-zero: 2 for a
bad spec or request, 1 otherwise (a failed or cancelled job included).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from client.errors import DistillAPIError
from client.sdk import Client

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
BAD_INPUT_CODES = ("invalid_spec", "shape_mismatch", "invalid_request")

Url = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="DISTILL_URL", help="The service (default http://127.0.0.1:8000)."
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="DISTILL_API_KEY", help="API key.", show_default=False),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def fail(code: str, message: str, exit_code: int = EXIT_FAILED) -> NoReturn:
    """One line on stderr, ``error[code]: message``, and the exit code."""
    err.print(f"[red]error[/red]\\[{code}]: {' '.join(message.split())}", markup=True)
    raise typer.Exit(exit_code)


def api_failure(exc: DistillAPIError) -> NoReturn:
    message = exc.message
    if exc.field and exc.field not in message:
        message += f" (field: {exc.field})"
    fail(exc.code, message, EXIT_BAD_INPUT if exc.code in BAD_INPUT_CODES else EXIT_FAILED)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """API errors and missing files as one line and a non-zero exit."""
    try:
        yield
    except DistillAPIError as exc:
        api_failure(exc)
    except FileNotFoundError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        fail("file_not_found", f"{exc.strerror or exc}{where}")


def connect(url: str | None, api_key: str | None) -> Client:
    return Client(url, api_key)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))
