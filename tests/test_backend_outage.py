"""The model server is down: the job waits on the queue and resumes later; nothing is lost.

Real parts: the OpenAI client against a loopback port where nothing listens (connection
refused), then the OpenAI-protocol server of tests/openai_server.py around the real embedded
model on that same port; the real store, the local forge, a real huey queue.
"""

from __future__ import annotations

import socket
import time

import pytest
from sqlalchemy import select

from bot import jobs
from bot.demo import DEMO_REQUIREMENT
from bot.runtime import build_queue, build_runtime, execute
from bot.settings import BackendSettings, QueueSettings
from bot.store.models import Job, JobStage, PullRequest, utcnow
from tests.support import git_out, make_settings
from tests.openai_server import serve_openai

SERVED = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outage_settings(tmp_path, db_url, port, **queue):
    return make_settings(
        tmp_path / "home",
        db_url,
        backend=BackendSettings(
            kind="openai", base_url=f"http://127.0.0.1:{port}/v1", model=SERVED,
            max_retries=0, max_new_tokens=160,
        ),
        queue=QueueSettings(lease_seconds=30, **queue),
    )


def stage_rows(store, job_id):
    with store.session() as s:
        return [(r.name, r.state) for r in s.scalars(
            select(JobStage).where(JobStage.job_id == job_id).order_by(JobStage.id))]


@pytest.mark.model
def test_job_waits_for_the_model_server_and_resumes_once_it_is_back(
    tmp_path, db_url, sample_repo, embedded_backend
):
    port = free_port()
    settings = outage_settings(tmp_path, db_url, port, backend_wait_seconds=2.0)
    runtime = build_runtime(settings)
    sub = jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                      requirement=DEMO_REQUIREMENT, max_bytes=100_000)

    first = execute(runtime, sub.job_id)
    assert first.state == "deferred"
    assert first.retry_in == pytest.approx(2.0)
    with runtime.store.session() as s:
        job = s.get(Job, sub.job_id)
        assert job.state == "queued"
        assert "waiting for the model server" in job.error
        assert "connection refused" in job.error
        assert "try 2 of 6" in job.error
    # The first stage that needs the server (the prompt asks it for the model's context
    # window) is the one that waits; nothing before it is redone.
    assert ("prompt", "failed") in stage_rows(runtime.store, sub.job_id)
    assert "codeloop/" not in git_out(sample_repo, "branch", "--list", "codeloop/*")

    # Not before its time: a second worker (or the recovery sweep) leaves it alone.
    assert execute(runtime, sub.job_id).state == "skipped"
    assert sub.job_id not in jobs.recoverable_jobs(runtime.store, settings.queue.lease_seconds)
    time.sleep(2.1)

    with serve_openai(embedded_backend, served_name=SERVED, port=port):
        second = execute(runtime, sub.job_id)
    assert second.state == "succeeded", second.error
    rows = stage_rows(runtime.store, sub.job_id)
    for early in ("workspace", "context", "prompt"):
        assert rows.count((early, "done")) == 1, rows  # checkpoints reused, not redone
    with runtime.store.session() as s:
        assert s.query(PullRequest).count() == 1
        assert s.get(Job, sub.job_id).runs == 2
    runtime.close()


def test_job_fails_with_a_clear_message_when_the_server_never_comes_back(
    tmp_path, sample_repo
):
    settings = outage_settings(tmp_path, None, free_port(), backend_wait_seconds=0.0, max_runs=2)
    runtime = build_runtime(settings)
    sub = jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                      requirement=DEMO_REQUIREMENT, max_bytes=100_000)
    assert execute(runtime, sub.job_id).state == "deferred"
    last = execute(runtime, sub.job_id)
    assert last.state == "failed"
    assert "the model server stayed unavailable after 2 tries" in last.error
    assert "connection refused" in last.error
    with runtime.store.session() as s:
        assert s.get(Job, sub.job_id).state == "failed"
        assert s.query(PullRequest).count() == 0
    runtime.close()


def test_the_worker_task_puts_a_deferred_job_back_on_the_queue_with_a_delay(tmp_path, sample_repo):
    settings = outage_settings(tmp_path, None, free_port(), backend_wait_seconds=45.0)
    runtime = build_runtime(settings)
    huey = build_queue(settings, lambda: runtime)
    sub = jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                      requirement=DEMO_REQUIREMENT, max_bytes=100_000)
    assert huey.codeloop_run_job.call_local(sub.job_id) == "deferred"
    pending = huey.pending()
    assert len(pending) == 1
    task = pending[0]
    assert task.args == (sub.job_id,)
    assert task.eta is not None
    wait = (task.eta - utcnow()).total_seconds()  # huey keeps naive UTC etas
    assert 30 < wait <= 45
    runtime.close()
