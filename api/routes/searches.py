"""Budget searches: create (child jobs proposed and queued), list, get, cancel."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import IdempotencyKeyHeader, SessionDep, TenantDep, page
from api.schemas import SearchList, SearchPublic, error_responses, json_response
from api.search_intake import store_search
from core.errors import NotFound
from core.logging import bind_log_context
from core.models import Job, Search, SearchJob, Tenant
from core.searches import cancel_search, search_jobs

log = logging.getLogger("distill.api")
router = APIRouter(prefix="/v1/searches", tags=["searches"], responses=error_responses(401))


def search_public(search: Search, jobs: list[Job]) -> SearchPublic:
    """The API's search object: the request, its child jobs, and the result once settled."""
    return SearchPublic.model_validate(
        {
            "id": search.id,
            "name": search.name,
            "status": search.status,
            "request": search.request,
            "jobs": [
                {
                    "id": j.id,
                    "status": j.status,
                    "student": j.spec.get("student") or {},
                    "method": (j.spec.get("distillation") or {}).get("method"),
                }
                for j in jobs
            ],
            "skipped": (search.plan or {}).get("skipped") or [],
            "result": search.result,
            "error": search.error,
            "cancel_requested": search.cancel_requested,
            "created_at": search.created_at,
            "finished_at": search.finished_at,
        }
    )


def owned_search(session: Session, search_id: str, tenant: Tenant) -> Search:
    """The tenant's search; NotFound for any other (never 403: no leaks)."""
    search = session.scalar(
        select(Search).where(Search.id == search_id, Search.tenant_id == tenant.id)
    )
    if search is None:
        raise NotFound(
            f"no search '{search_id}'; list yours with GET /v1/searches",
            details={"id": search_id, "resource": "search"},
        )
    return search


SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "A job spec without `student`, plus `budget` "
                    "(max_parameters, max_size_bytes, max_latency_ms), `trials` and `space` "
                    "(presets, widths, depths, methods).",
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=SearchPublic,
    responses={200: {"model": SearchPublic, "description": "Replayed (same Idempotency-Key)"}}
    | error_responses(409, 422, 429),
    openapi_extra=SEARCH_BODY,
)
async def create_search(
    body: Annotated[dict[str, Any], Body(description="the base spec, budget and trials")],
    request: Request,
    tenant: TenantDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Start a budget search: candidate students run as child jobs across the workers."""
    state = request.app.state
    stored = await run_in_threadpool(
        store_search, state.sessions, state.settings, tenant, body, idempotency_key
    )
    bind_log_context(search_id=stored.search_id)
    for job_id, queue in stored.to_send:
        try:
            state.enqueue(SimpleNamespace(id=job_id, queue=queue))
        except Exception:  # noqa: BLE001 - the job is saved; the reconciler sends queued jobs
            log.warning("could not enqueue %s; the reconciler will send it", job_id, exc_info=True)
    public = await run_in_threadpool(_read, state.sessions, stored.search_id, tenant)
    if stored.replayed:
        return json_response(public, headers={"Idempotent-Replayed": "true"})
    return json_response(public, status_code=201)


def _read(sessions: Any, search_id: str, tenant: Tenant) -> SearchPublic:
    with sessions() as session:
        search = owned_search(session, search_id, tenant)
        return search_public(search, search_jobs(session, search.id))


@router.get("", response_model=SearchList, responses=error_responses(422))
def list_searches(
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
) -> dict[str, Any]:
    """List the tenant's searches, newest first."""
    query = select(Search).where(Search.tenant_id == tenant.id)
    if after:
        query = query.where(Search.id < after)
    rows = list(session.scalars(query.order_by(Search.id.desc()).limit(limit + 1)))
    data, has_more = page(rows, limit)
    children: dict[str, list[Job]] = {s.id: [] for s in data}
    if data:
        linked = session.execute(
            select(SearchJob.search_id, Job)
            .join(Job, Job.id == SearchJob.job_id)
            .where(SearchJob.search_id.in_(list(children)))
            .order_by(Job.id)
        )
        for search_id, job in linked:
            children[search_id].append(job)
    return {"data": [search_public(s, children[s.id]) for s in data], "has_more": has_more}


@router.get("/{search_id}", response_model=SearchPublic, responses=error_responses(404))
def get_search(search_id: str, session: SessionDep, tenant: TenantDep) -> SearchPublic:
    """Get a search: its child jobs and, once they have all ended, the trials and Pareto set."""
    bind_log_context(search_id=search_id)
    search = owned_search(session, search_id, tenant)
    return search_public(search, search_jobs(session, search.id))


@router.post("/{search_id}/cancel", response_model=SearchPublic, responses=error_responses(404))
def cancel(search_id: str, session: SessionDep, tenant: TenantDep) -> SearchPublic:
    """Cancel a search (idempotent): each child job still queued or running is cancelled."""
    search = owned_search(session, search_id, tenant)
    cancel_search(session, search)
    session.expire_all()
    search = owned_search(session, search_id, tenant)
    return search_public(search, search_jobs(session, search.id))
