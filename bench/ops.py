"""Benchmark of the operations endpoints: `/metrics` scrape time against a store with many
jobs (SQLite and PostgreSQL), webhook acknowledgement through the timing middleware, and the
dashboard's jobs page. Prints a table.

    .venv/bin/python bench/ops.py [--jobs 2000] [--postgres postgresql+psycopg://…/test]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import SecretStr  # noqa: E402
from sqlalchemy import insert  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from bot import deliveries  # noqa: E402
from bot.serve import build_app  # noqa: E402
from bot.settings import Settings, StoreSettings, WebSettings  # noqa: E402
from bot.store.db import Store  # noqa: E402
from bot.store.models import Job, JobStage, Request, utcnow  # noqa: E402

STAGES = ["workspace", "context", "prompt", "generate-1", "validate-1", "publish"]


def fill(store: Store, jobs: int) -> None:
    now = utcnow()
    with store.session() as s:
        s.execute(insert(Request), [
            {"id": i, "idempotency_key": f"k{i}", "source": "cli", "repo": "/r",
             "requirement": "x", "truncated": False, "reply_to": {}, "created_at": now}
            for i in range(1, jobs + 1)])
        s.execute(insert(Job), [
            {"id": i, "key": f"create:k{i}", "request_id": i, "kind": "create",
             "state": "succeeded" if i % 10 else "failed", "runs": 1, "result": {},
             "created_at": now} for i in range(1, jobs + 1)])
        rows = []
        for i in range(1, jobs + 1):
            for n, name in enumerate(STAGES):
                out = {}
                if name.startswith("generate"):
                    out = {"model": "m", "completion_tokens": 120, "prompt_tokens": 900}
                if name.startswith("validate"):
                    out = {"ok": bool(i % 3)}
                rows.append({"job_id": i, "name": name, "state": "done", "output": out,
                             "started_at": now, "finished_at": now + timedelta(seconds=n),
                             "seconds": 0.1 * (n + 1)})
        s.execute(insert(JobStage), rows)


def timed(fn, runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, max(times) * 1000


def row(name: str, median: float, worst: float, note: str = "") -> None:
    print(f"| {name:<52} | {median:>9.1f} | {worst:>9.1f} | {note}")


def bench(url: str, label: str, jobs: int, home: Path) -> None:
    store = Store(url)
    fill(store, jobs)
    settings = Settings(home=home, store=StoreSettings(url=url),
                        web=WebSettings(dashboard_token=SecretStr("bench")))
    app = build_app(settings, store, enqueue_delivery=lambda pk: None)
    with TestClient(app) as client:
        med, worst = timed(lambda: client.get("/metrics").raise_for_status(), 20)
        row(f"{label}: GET /metrics ({jobs} jobs, {jobs * 6} stages)", med, worst)
        counter = iter(range(10**9))

        def ack():
            # the shape of a webhook handler: one INSERT, then the answer
            rec = deliveries.record(store, source="github", delivery_id=f"d{next(counter)}",
                                    event="ping", payload={"zen": "x"})
            return rec

        med, worst = timed(ack, 50)
        row(f"{label}: deliveries.record (the ack's work)", med, worst)
        client.post("/login", data={"token": "bench"})
        med, worst = timed(lambda: client.get("/").raise_for_status(), 10)
        row(f"{label}: dashboard jobs page (200 newest)", med, worst)
    store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--postgres", default=os.environ.get(
        "CODELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print(f"| {'what':<52} | {'median ms':>9} | {'worst ms':>9} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 11}|")
    with tempfile.TemporaryDirectory() as tmp:
        bench(f"sqlite:///{tmp}/bench.db", "SQLite", args.jobs, Path(tmp))
        try:
            import psycopg

            admin_url = args.postgres.replace("postgresql+psycopg://", "postgresql://")
            name = f"codeloop_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            try:
                bench(args.postgres.rpartition("/")[0] + f"/{name}", "PostgreSQL", args.jobs,
                      Path(tmp))
            finally:
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception as exc:  # noqa: BLE001 - PostgreSQL is optional here
            print(f"(PostgreSQL skipped: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
