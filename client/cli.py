"""The `distill` command line (typer). Each group of commands lives in its own module."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="distill: distillation as a service.")


def _register() -> None:
    # Command modules add themselves to `app`; a missing module means that part is not installed.
    import importlib

    for module in (
        "client.run_cmd",
        "client.service_cmds",
        "client.serve_cmds",
        "client.resource_cmds",
        "client.search_cmds",
        "client.demo_cmd",
    ):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_register()

if __name__ == "__main__":
    # Run the module's own `app` (the one the command modules registered on), not __main__'s.
    from client.cli import app as registered_app

    registered_app()
