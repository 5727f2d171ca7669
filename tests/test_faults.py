"""Faults: a worker killed (SIGKILL) at every point of the pipeline in turn, and the database
connection cut mid-job. After each, the job finishes exactly once: one branch with one commit,
one pull request, one final message, and the model asked once.

Real parts: `codeloop worker` subprocesses on the real huey queue, the real embedded model,
the local forge, SQLite and PostgreSQL. The kill comes from inside the worker
(settings.failpoint), so it lands exactly at the named point, every run.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import func, select

from bot import jobs
from bot.demo import DEMO_REQUIREMENT
from bot.runtime import build_runtime, execute
from bot.store.db import Store
from bot.store.models import Job, JobStage, PullRequest, Revision
from tests.support import cli_env, git_out, make_settings, poll, rows

pytestmark = pytest.mark.model

KILL_POINTS = [
    "workspace", "context", "prompt", "generate-1", "validate-1", "publish",
    "publish:pushed", "publish:opened",
]


def run_worker(env: dict, log, failpoint: str | None) -> subprocess.Popen:
    env = dict(env)
    if failpoint:
        env["CODELOOP_FAILPOINT"] = failpoint
    return subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_killed_at_every_point_the_job_still_finishes_once(tmp_path, db_url, sample_repo,
                                                           embedded_model_dir):
    settings = make_settings(tmp_path / "home", db_url)
    env = cli_env(settings)
    queued = subprocess.run(
        [sys.executable, "-m", "bot.cli", "run", "--queue", DEMO_REQUIREMENT,
         "--repo", str(sample_repo)], env=env, capture_output=True, text=True, timeout=120)
    assert queued.returncode == 0, queued.stderr
    store = Store(settings.database_url)
    log_path = tmp_path / "workers.log"
    with open(log_path, "w") as log:
        for point in KILL_POINTS:
            worker = run_worker(env, log, f"kill:{point}")
            try:
                code = worker.wait(timeout=600)
            finally:
                if worker.poll() is None:
                    worker.kill()
            assert code == -9, f"the worker was not killed at {point}: {log_path.read_text()}"
        worker = run_worker(env, log, None)
        try:
            poll(lambda: rows(store, select(Job.state)) in (["succeeded"], ["failed"]), 600)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    out = log_path.read_text()
    with store.session() as s:
        job = s.scalar(select(Job))
        assert job.state == "succeeded", (job.error, out)
        assert job.runs == len(KILL_POINTS) + 1
        assert s.scalar(select(func.count()).select_from(PullRequest)) == 1
        assert s.scalar(select(func.count()).select_from(Revision)) == 1
        generated = s.scalars(select(JobStage.state).where(JobStage.name == "generate-1")).all()
        assert generated.count("done") == 1  # killed mid-generation once; asked again once
        for point in ("workspace", "context", "prompt", "generate-1", "validate-1"):
            states = s.scalars(select(JobStage.state).where(JobStage.name == point)
                               .order_by(JobStage.id)).all()
            assert states == ["interrupted", "done"], (point, states)
    branches = [b for b in git_out(sample_repo, "branch").split() if b.startswith("codeloop/")]
    assert len(branches) == 1
    assert git_out(sample_repo, "rev-list", "--count", f"main..{branches[0]}").strip() == "1"
    assert out.count("pull request #1 on codeloop/") == 1, out  # one final message
    store.close()


def test_database_connections_cut_mid_job_the_job_carries_on(tmp_path, postgres_url, sample_repo,
                                                             embedded_backend):
    import psycopg

    settings = make_settings(tmp_path / "home", postgres_url)
    runtime = build_runtime(settings, backend=embedded_backend)
    sub = jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                      requirement=DEMO_REQUIREMENT, max_bytes=100_000)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(o=execute(runtime, sub.job_id)))
    worker.start()
    probe = Store(postgres_url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with probe.session() as s:
            running = s.scalar(select(JobStage.name).where(JobStage.state == "running"))
        if running and running.startswith("generate"):
            break
        time.sleep(0.05)
    probe.close()
    dbname = postgres_url.rsplit("/", 1)[1]
    admin = postgres_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        cut = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchone()[0]
    assert cut >= 1  # the worker's pooled connections were cut
    worker.join(timeout=600)
    assert outcome["o"].state == "succeeded", outcome["o"].error
    with runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(PullRequest)) == 1
    runtime.close()
