"""The dashboard's pages and its static files.

Every page is the same HTML shell (``static/index.html``); its JavaScript modules draw the view
for the path and fetch the data from ``/v1`` with the API key the user typed in (kept in the
browser's localStorage, sent as ``Authorization: Bearer``). The shell, the static files and the
form defaults need no key: they hold nothing that belongs to a tenant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from core.spec import (
    METHODS,
    PRESET_DEFAULTS,
    JobSpec,
    KDMethod,
    MSEMethod,
    Quantization,
    TrainingSpec,
)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PATH = "/dashboard/static"

# The pages only load files from this origin; nothing may frame them.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _shell() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


@router.get("/")
def jobs_page() -> FileResponse:
    """The jobs table."""
    return _shell()


@router.get("/jobs/new")
def new_job_page() -> FileResponse:
    """The job form."""
    return _shell()


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    """One job: live curves, result, artifacts, cancel."""
    return _shell()


@router.get("/uploads")
def uploads_page() -> FileResponse:
    """Models and datasets, with their upload forms."""
    return _shell()


@router.get("/searches")
def searches_page() -> FileResponse:
    """The budget searches."""
    return _shell()


@router.get("/searches/{search_id}")
def search_page(search_id: str) -> FileResponse:
    """One search: accuracy against latency, the Pareto set and the best within budget."""
    return _shell()


@router.get("/dashboard/config.json")
def dashboard_config(request: Request) -> dict[str, Any]:
    """What the job form needs: every default of the spec, and whether a key is required."""
    return {
        "auth": request.app.state.settings.auth,
        "training": TrainingSpec().model_dump(mode="json"),
        "methods": list(METHODS),
        "method_defaults": {"kd": KDMethod().model_dump(), "mse": MSEMethod().model_dump()},
        "presets": PRESET_DEFAULTS,
        "export": JobSpec.model_fields["export"].get_default(call_default_factory=True),
        "quantize": list(get_args(Quantization)),
    }


def install(app: FastAPI) -> None:
    """Serve the dashboard pages and mount their static files on ``app``."""
    app.include_router(router)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="dashboard-static")
