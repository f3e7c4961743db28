"""Browser fixtures: Debian's headless Chromium driven by Playwright, against a real API + worker.

Needs ``apt-get install chromium`` and ``pip install playwright`` (no ``playwright install``:
the system Chromium is launched). Without them the tests skip, or fail under
``DISTILL_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.auth import create_key
from core.db import session_factory
from tests.conftest import REQUIRE_SERVICES
from tests.service.helpers import migrate, service_env, start_api, start_worker

CHROMIUM = os.environ.get("DISTILL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Screenshots go to a scratch folder, so that running the tests leaves the tree clean;
# DISTILL_SCREENSHOT_DIR=docs/img refreshes the README's pictures.
SCREENSHOTS = Path(
    os.environ.get("DISTILL_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "distill-screenshots"
)


def _require_browser() -> None:
    missing = []
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class Service:
    base: str
    key: str
    http: httpx.Client
    logs: Path

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The API (auth on, one key) and one worker on SQLite and the embedded broker."""
    _require_browser()
    tmp = tmp_path_factory.mktemp("dashboard")
    database = f"sqlite:///{tmp / 'distill.db'}"
    migrate(database)
    with session_factory(database)() as session:
        _, key = create_key(session, "dashboard")
        session.commit()
    env = service_env(
        data_dir=str(tmp / "data"),
        storage_url=f"file://{tmp / 'blobs'}",
        database_url=database,
        auth="on",
    )
    api, base = start_api(env, tmp)
    try:
        worker = start_worker(env, tmp)
    except BaseException:
        api.stop()
        raise
    http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    try:
        yield Service(base, key, http, tmp)
    finally:
        http.close()
        worker.stop()
        api.stop()


@pytest.fixture(scope="module")
def browser(service: Service) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, service: Service) -> Iterator[Any]:
    """A fresh page (own storage); fails the test on any uncaught script error."""
    context = browser.new_context(
        base_url=service.base, accept_downloads=True, viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"{msg.text} ({msg.location.get('url')})")
            if msg.type == "error"
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    # 401 and 422 answers are part of the tests; any other error is a bug in the page.
    unexpected = [e for e in errors if not any(f"status of {s}" in e for s in (401, 422))]
    assert not unexpected, f"the page logged errors: {unexpected}"


def with_key(page: Any, key: str) -> Any:
    """Store the key the way the page does before any of its scripts run."""
    page.context.add_init_script(f"localStorage.setItem('distill.apiKey', {key!r})")
    return page


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
