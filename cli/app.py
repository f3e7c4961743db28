"""The `distill` command line (typer): the app that the command modules register on.

resource_cmds and search_cmds call the service through the SDK (client/); run_cmd runs the engine
on this machine; demo_cmd runs the demo; serve_cmds and service_cmds start the service's parts.
"""

from __future__ import annotations

from typing import Any

import typer
import typer.core

app = typer.Typer(no_args_is_help=True, help="distill: distillation as a service.")


def _hide_flag_types() -> None:
    """Show no value type beside a flag in --help: typer's rich help prints "--help <bool>" as
    if flags took a value (click itself does not)."""
    option = typer.core.TyperOption
    shown = option.display_type_rich

    def display_type_rich(self: typer.core.TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else shown(self, ctx)

    option.display_type_rich = display_type_rich  # type: ignore[method-assign]


_hide_flag_types()


def _register() -> None:
    # Command modules add themselves to `app`; a missing module means that part is not installed.
    import importlib

    for module in (
        "cli.run_cmd",
        "cli.service_cmds",
        "cli.serve_cmds",
        "cli.resource_cmds",
        "cli.search_cmds",
        "cli.demo_cmd",
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_register()
