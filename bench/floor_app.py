"""The latency benchmark's yardstick: the least a POST can do on the service's own stack.

``POST /v1/jobs`` here inserts one row and commits (in a worker thread, as FastAPI runs
blocking work), answers, and hands the id to a thread that sends it with Celery: no auth, no
validation, no events, no batching. Its p99 at a given rate, measured next to the API's, tells
what this machine allows at that moment. Same settings as the service (DISTILL_DATABASE_URL,
DISTILL_BROKER_URL); the row goes to a table of its own, ``bench_floor``.

    uvicorn --factory floor_app:create_app --app-dir bench
"""

from __future__ import annotations

import json
import threading
import uuid
from queue import SimpleQueue

from fastapi import FastAPI, Request, Response
from sqlalchemy import JSON, Column, MetaData, String, Table, insert
from starlette.concurrency import run_in_threadpool

from core.config import get_settings
from core.db import get_engine
from worker.celery_app import RUN_JOB_TASK, make_celery

FLOOR = Table(
    "bench_floor", MetaData(), Column("id", String(40), primary_key=True), Column("body", JSON)
)


def create_app() -> FastAPI:
    settings = get_settings()
    engine = get_engine(settings.database)
    FLOOR.create(engine, checkfirst=True)
    celery = make_celery(settings)
    pending: SimpleQueue[str] = SimpleQueue()

    def send() -> None:
        producer = celery.producer_pool.acquire(block=True)
        while True:
            celery.send_task(RUN_JOB_TASK, args=[pending.get()], queue="bench", producer=producer)

    threading.Thread(target=send, daemon=True).start()

    def store(body: object) -> str:
        row_id = uuid.uuid4().hex
        with engine.begin() as conn:
            conn.execute(insert(FLOOR), [{"id": row_id, "body": body}])
        return row_id

    app = FastAPI()

    @app.post("/v1/jobs")
    async def create(request: Request) -> Response:
        body = json.loads(await request.body())
        row_id = await run_in_threadpool(store, body)
        pending.put(row_id)
        return Response(
            json.dumps({"id": row_id, "status": "queued"}), 201, media_type="application/json"
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
