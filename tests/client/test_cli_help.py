"""`--help` of every command reads as a user expects: flags take no value."""

from __future__ import annotations

from typing import Any

import typer
from typer.testing import CliRunner

from cli.app import app


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in getattr(group, "commands", {}).items():
        found.extend(_commands(command, (*path, name)))
    return found


def test_no_help_shows_a_value_type_beside_a_flag() -> None:
    paths = _commands(typer.main.get_command(app))
    assert ("keys", "create") in paths and ("jobs", "submit") in paths
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, (path, r.output)
        assert "<bool>" not in r.stdout, (path, r.stdout)
        assert "--help  " in r.stdout, path
    submit = runner.invoke(app, ["jobs", "submit", "--help"], env={"COLUMNS": "200"}).stdout
    assert "<path>" in submit  # options that take a value still say which
    assert "default http://127.0.0.1:8000" in submit
