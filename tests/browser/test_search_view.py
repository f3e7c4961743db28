"""The dashboard's search view in a real browser: the scatter plot of accuracy against latency
with the Pareto set and the best within budget marked, the trials table, and the list.

The search and its finished trials are written to the database directly (training them is the
end-to-end test's job, tests/service/test_search_end_to_end.py); the page reads them through
the API as it would any search.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from core.db import session_factory
from core.models import ApiKey, Job, Search, SearchJob, new_id, utcnow
from core.searches import search_result
from tests.browser.conftest import Service, screenshot, with_key

pytestmark = pytest.mark.service

# (student width, accuracy, latency ms, size bytes): b is dominated by a, d is too slow.
TRIALS = [
    (8, 0.80, 0.05, 2_000),
    (16, 0.79, 0.08, 4_000),
    (32, 0.92, 0.12, 9_000),
    (64, 0.95, 3.0, 30_000),
]
BUDGET = {"max_latency_ms": 1.0}


def _settled_search(service: Service) -> tuple[str, list[str]]:
    sessions = session_factory(f"sqlite:///{service.logs / 'distill.db'}")
    with sessions() as session:
        tenant_id = session.scalar(select(ApiKey.tenant_id))
        search = Search(
            id=new_id("srch"),
            tenant_id=tenant_id,
            name="digits under 1 ms",
            status="running",
            request={"budget": BUDGET, "trials": len(TRIALS)},
            plan={"skipped": []},
            cancel_requested=False,
        )
        session.add(search)
        jobs = []
        for width, accuracy, latency, size in TRIALS:
            job = Job(
                id=new_id("job"),
                tenant_id=tenant_id,
                status="succeeded",
                spec={
                    "student": {"preset": "mlp", "width": width, "depth": 1},
                    "distillation": {"method": "kd"},
                },
                result={
                    "student": {
                        "accuracy": accuracy,
                        "parameters": size // 4,
                        "size_bytes": size,
                        "latency_ms_p50": latency,
                    }
                },
                finished_at=utcnow(),
            )
            session.add(job)
            session.flush()
            session.add(SearchJob(job_id=job.id, search_id=search.id))
            jobs.append(job)
        session.flush()
        search.result = search_result(search, jobs)
        search.status, search.finished_at = "succeeded", utcnow()
        session.commit()
        return search.id, [j.id for j in jobs]


def test_search_scatter_marks_pareto_and_best(page: Any, service: Service) -> None:
    search_id, (a, b, c, d) = _settled_search(service)
    with_key(page, service.key)
    page.goto("/searches")
    row = page.locator(f"#searches-table tr[data-search-id='{search_id}']")
    row.wait_for()
    assert c in row.inner_text() and "4/4" in row.inner_text()
    row.locator("a").click()

    page.wait_for_selector("#search-scatter")
    assert page.get_attribute("#search-scatter", "data-points") == "4"
    assert page.get_attribute("circle.point.best", "data-job-id") == c
    pareto = {page.get_attribute(f"circle.point.pareto >> nth={i}", "data-job-id") for i in (0, 1)}
    assert pareto == {a, d}  # the best is drawn as best; b is dominated by a
    assert page.locator("circle.point").count() == 4
    assert (
        page.locator("line.budget").count() == 1 and page.locator("path.pareto-line").count() == 1
    )
    assert c in page.inner_text("#search-best")
    best_row = page.locator("#trials-table tr[data-best=true]")
    assert best_row.get_attribute("data-job-id") == c and "★" in best_row.inner_text()
    assert page.locator("#trials-table tr[data-pareto=true]").count() == 3
    screenshot(page, "search.png")
    # A trial links to its job's page: an ordinary job.
    best_row.locator("a").click()
    page.wait_for_url(f"**/jobs/{c}")
