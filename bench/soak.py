"""Soak test of the service's fault handling on PostgreSQL + Redis (docs/RELIABILITY.md).

Two phases on one real service (uvicorn, Celery workers, the reconciler):

1. ``--kills`` SIGKILLs of a whole worker (main process and job process) at random moments while
   ``--kill-jobs`` jobs run on two workers; each killed worker is replaced at once.
2. ``--queued`` small jobs submitted with no worker running, the Redis database wiped with
   FLUSHDB, then two workers and the reconciler started.

For each phase it reports how many jobs finished, how they ended, how many ran more than once
(a second success, artifacts of two attempts, or epochs trained twice past a checkpoint), and how
long it took. Usage (PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379)::

    .venv/bin/python bench/soak.py --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import POSTGRES_URL, REDIS_URL  # noqa: E402
from tests.service.fault_stack import TERMINAL, Stack, job_spec, kill_group  # noqa: E402
from tests.service.helpers import fresh_postgres, migrate  # noqa: E402


def _summary(stack: Stack, jobs: list[str], epochs: int) -> dict[str, Any]:
    """How the jobs ended and whether any ran (partly) twice."""
    outcomes: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    twice, retrained = 0, 0
    for job_id in jobs:
        job = stack.job(job_id)
        outcomes[job.status if job.status != "failed" else f"failed:{job.error['code']}"] += 1
        attempts[job.attempt] += 1
        successes = [e for e in stack.events(job_id, "status") if e["status"] == "succeeded"]
        artifact_attempts = {a.attempt for a in stack.artifacts(job_id)}
        trained = [e["epoch"] for e in stack.events(job_id, "metrics")]
        if len(successes) > 1 or len(artifact_attempts) > 1:
            twice += 1
        retrained += len(trained) - len(set(trained))
    return {
        "jobs": len(jobs),
        "outcomes": dict(outcomes),
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "finished_twice": twice,
        "epochs_trained_again": retrained,
        "epochs_per_job": epochs,
    }


def _wait_all(stack: Stack, jobs: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(jobs)
    while pending and time.monotonic() < deadline:
        pending = {j for j in pending if stack.job(j).status not in TERMINAL}
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"{len(pending)} jobs still not finished after {timeout:.0f}s")


def kill_phase(stack: Stack, ids: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    workers = [stack.start_worker(), stack.start_worker()]
    spec = job_spec(ids["teacher"], ids["digits"], epochs=args.epochs, batch_size=8)
    jobs = [stack.submit(spec) for _ in range(args.kill_jobs)]
    started = time.monotonic()
    kills = 0
    while kills < args.kills:
        time.sleep(rng.uniform(1.0, args.max_kill_gap))
        if all(stack.job(j).status in TERMINAL for j in jobs):
            break
        victim = rng.choice(workers)
        kill_group(victim)
        workers.remove(victim)
        stack.workers.remove(victim)
        stack.procs.remove(victim)
        kills += 1
        workers.append(stack.start_worker())
    _wait_all(stack, jobs, timeout=600)
    took = time.monotonic() - started
    stack.stop_workers()
    return {"kills": kills, "seconds": round(took, 1), **_summary(stack, jobs, args.epochs)}


def wipe_phase(stack: Stack, ids: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    assert stack.beat is not None
    stack.beat.stop()
    stack.procs.remove(stack.beat)
    spec = job_spec(ids["teacher"], ids["digits"], epochs=1)
    jobs = [stack.submit(spec) for _ in range(args.queued)]
    lost = stack.redis.dbsize()
    stack.redis.flushdb()
    wiped = time.monotonic()
    stack.start_worker()
    stack.start_worker()
    stack.start_beat()
    first = None
    while first is None:
        if any(stack.job(j).status != "queued" for j in jobs):
            first = time.monotonic() - wiped
        time.sleep(0.2)
    _wait_all(stack, jobs, timeout=900)
    took = time.monotonic() - wiped
    stack.stop_workers()
    return {
        "redis_keys_wiped": lost,
        "seconds_to_first_start": round(first, 1),
        "seconds_to_all_finished": round(took, 1),
        **_summary(stack, jobs, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--kill-jobs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-kill-gap", type=float, default=6.0)
    parser.add_argument("--queued", type=int, default=100)
    parser.add_argument("--max-attempts", type=int, default=6)
    parser.add_argument("--redis-db", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from tests.service.fault_stack import write_inputs

    broker = REDIS_URL.rsplit("/", 1)[0] + f"/{args.redis_db}"
    with tempfile.TemporaryDirectory(prefix="distill-soak-") as folder:
        tmp = Path(folder)
        with fresh_postgres(POSTGRES_URL) as url:
            migrate(url)
            stack = Stack(tmp, url, broker)
            stack.settings["max_attempts"] = str(args.max_attempts)
            stack.redis.flushdb()
            started = time.monotonic()
            try:
                stack.start_api()
                stack.start_beat()
                files = write_inputs(tmp / "inputs")
                ids = {
                    "teacher": stack.upload("/v1/models", files["teacher"], input_shape="[1,8,8]"),
                    "digits": stack.upload("/v1/datasets", files["digits"]),
                }
                report = {
                    "worker_kills": kill_phase(stack, ids, args),
                    "redis_wipe": wipe_phase(stack, ids, args),
                }
            finally:
                stack.stop_all()
                stack.redis.flushdb()
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report["total_seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
