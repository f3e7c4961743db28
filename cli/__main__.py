"""`python -m cli …` runs the `distill` command."""

from cli.app import app

app()
