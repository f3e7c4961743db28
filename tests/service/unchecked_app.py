"""An API app whose spec validation lets NUL characters and non-finite numbers through.

It stands for a value that passes validation but that the database refuses, so that a test can
show the intake's group commit isolates such a request from the others of its batch.
"""

from __future__ import annotations

from fastapi import FastAPI

import core.spec
from api.main import create_app


def create_unchecked_app() -> FastAPI:
    core.spec.check_values = lambda data: None  # type: ignore[assignment]
    return create_app()
