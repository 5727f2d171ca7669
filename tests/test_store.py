"""The store on SQLite and PostgreSQL: migrations, idempotent submits, leases that only one
worker can hold, review signals stored once, and stage checkpoints."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from bot import jobs
from bot.pipeline import JobCancelled, Stages
from bot.store.db import Store, insert_or_get, schema_is_current
from bot.store.models import (
    Base,
    Job,
    JobStage,
    PullRequest,
    Request,
    ReviewSignal,
    Revision,
    SlackThread,
    utcnow,
)
from feedback.signals import SignalError, record_signal

TABLES = {"requests", "jobs", "job_stages", "pull_requests", "revisions", "review_signals",
          "model_versions", "edit_format_stats", "deliveries", "merged_changes", "alembic_version",
          "slack_channel_links", "slack_threads", "slack_job_messages",
          "github_status_comments", "github_review_replies"}
TABLES |= {"training_runs", "model_promotions"}  # the learning loop (training/)
TABLES |= {"candidates"}  # every generated candidate and its validation (best of N)
ELSEWHERE_A = "other-host-a:100:boot"  # owners on another host: never presumed dead
ELSEWHERE_B = "other-host-b:200:boot"
OWNERS = (ELSEWHERE_A, ELSEWHERE_B)


@pytest.fixture
def store(db_url):
    store = Store(db_url)
    yield store
    store.close()


def submit(store: Store, requirement: str = "add a shout function", **kw) -> jobs.Submitted:
    return jobs.submit(store, source="cli", repo="/tmp/repo", requirement=requirement,
                       max_bytes=10_000, **kw)


def count(store: Store, model) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def get_job(store: Store, job_id: int) -> Job:
    with store.session() as s:
        return s.get(Job, job_id)


class RecordingNotifier:
    def __init__(self):
        self.calls: list[tuple] = []

    def stage(self, job_id: int, stage: str, detail: str = "") -> None:
        self.calls.append(("stage", job_id, stage))

    def finished(self, job_id: int, text: str, ok: bool) -> None:
        self.calls.append(("finished", job_id, ok))


def stage_rows(store: Store, job_id: int) -> list[JobStage]:
    with store.session() as s:
        return list(s.scalars(select(JobStage).where(JobStage.job_id == job_id)
                              .order_by(JobStage.id)))


def all_at_once(n: int, fn):
    """Call fn(0..n-1) from n threads released together; returns the results in order."""
    barrier = threading.Barrier(n)

    def call(i):
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


# ---------------------------------------------------------------- migrations


def test_new_database_gets_every_table_and_reopening_keeps_data(db_url):
    bare = Store(db_url, auto_migrate=False)
    assert not schema_is_current(bare.engine)
    bare.close()

    store = Store(db_url)
    assert TABLES <= set(store.tables())
    assert set(store.tables()) == set(Base.metadata.tables) | {"alembic_version"}
    assert schema_is_current(store.engine)
    first = submit(store)
    store.close()

    again = Store(db_url)  # migrates again: nothing to do
    try:
        assert schema_is_current(again.engine)
        assert set(again.tables()) == TABLES
        assert count(again, Request) == 1 and count(again, Job) == 1
        assert submit(again) == jobs.Submitted(first.request_id, first.job_id, created=False)
    finally:
        again.close()


# ---------------------------------------------------------------- submit


def test_submit_is_idempotent_per_request(store):
    first = submit(store)
    again = submit(store, "  add a shout function\n")
    assert first.created and not again.created
    assert (again.request_id, again.job_id) == (first.request_id, first.job_id)

    redelivered = submit(store, delivery="delivery-1")
    assert redelivered.created and redelivered.request_id != first.request_id
    assert submit(store, delivery="delivery-1").job_id == redelivered.job_id
    assert count(store, Request) == 2 and count(store, Job) == 2


def test_concurrent_submits_of_one_request_make_one_job(store):
    results = all_at_once(8, lambda _: submit(store))
    assert len({(r.request_id, r.job_id) for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert count(store, Request) == 1 and count(store, Job) == 1


def test_concurrent_insert_or_get_writes_one_row_and_all_callers_get_its_id(store):
    request_id = submit(store).request_id

    def insert(i):
        with store.session() as s:
            return insert_or_get(s, Job, dict(key="revise:review-1", request_id=request_id,
                                              kind="revise", feedback=f"caller {i}"),
                                 key=("key",))

    results = all_at_once(8, insert)
    assert sum(created for _, created in results) == 1
    assert len({job_id for job_id, _ in results}) == 1
    with store.session() as s:
        row = s.scalar(select(Job).where(Job.key == "revise:review-1"))
        assert row.id == results[0][0]
        winner = next(i for i, (_, created) in enumerate(results) if created)
        assert row.feedback == f"caller {winner}"  # the losers wrote nothing


def test_insert_or_get_conflicting_on_another_unique_constraint_writes_nothing(store):
    first, second = submit(store, "one").request_id, submit(store, "two").request_id
    with store.session() as s:
        assert insert_or_get(s, SlackThread, dict(channel_id="C1", thread_ts="1.0",
                                                  request_id=first, user_id="U1"),
                             key=("request_id",))[1]
    with store.session() as s:  # same thread, other request: the thread's constraint holds
        assert insert_or_get(s, SlackThread, dict(channel_id="C1", thread_ts="1.0",
                                                  request_id=second, user_id="U2"),
                             key=("request_id",)) == (None, False)
    assert count(store, SlackThread) == 1


# ---------------------------------------------------------------- leases


def test_only_one_of_two_concurrent_claims_wins(store):
    for i in range(10):
        job_id = submit(store, f"requirement {i}").job_id
        won = all_at_once(2, lambda n, job_id=job_id: jobs.claim(store, job_id, OWNERS[n], 60))
        assert sorted(won) == [False, True], f"round {i}: {won}"
        job = get_job(store, job_id)
        assert (job.state, job.runs, job.lease_owner) == ("running", 1, OWNERS[won.index(True)])


def test_live_lease_blocks_other_owners_until_it_expires(store):
    job_id = submit(store).job_id
    assert jobs.claim(store, job_id, ELSEWHERE_A, 60)
    assert not jobs.claim(store, job_id, ELSEWHERE_B, 60)

    with store.session() as s:  # time passes: A stopped renewing its lease
        s.get(Job, job_id).lease_until = utcnow() - timedelta(seconds=1)
    assert jobs.claim(store, job_id, ELSEWHERE_B, 60)
    job = get_job(store, job_id)
    assert (job.state, job.runs, job.lease_owner) == ("running", 2, ELSEWHERE_B)
    assert job.lease_until > utcnow()
    assert not jobs.renew(store, job_id, ELSEWHERE_A, 60)

    jobs.finish(store, job_id, ELSEWHERE_A, state="failed", error="late", result={"x": 1})
    job = get_job(store, job_id)
    assert (job.state, job.error, job.result, job.finished_at) == ("running", None, {}, None)

    jobs.finish(store, job_id, ELSEWHERE_B, state="succeeded", error=None, result={"pr": 1})
    job = get_job(store, job_id)
    assert (job.state, job.result, job.lease_until) == ("succeeded", {"pr": 1}, None)
    assert not jobs.claim(store, job_id, ELSEWHERE_A, 60)
    assert get_job(store, job_id).state == "succeeded"


def test_cancelled_job_cannot_be_claimed_and_runs_no_stage(store):
    job_id = submit(store).job_id
    assert jobs.cancel(store, job_id)
    job = get_job(store, job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert not jobs.claim(store, job_id, ELSEWHERE_A, 60)
    assert not jobs.cancel(store, job_id)
    assert get_job(store, job_id).runs == 0
    with pytest.raises(JobCancelled):
        Stages(store, job_id, RecordingNotifier()).run("a", lambda: pytest.fail("stage ran"))
    assert stage_rows(store, job_id) == []


def test_job_of_a_dead_local_worker_is_recoverable_at_once(store):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid no longer runs
    dead_owner = f"{socket.gethostname()}:{child.pid}:{jobs._boot_id()}"
    dead_job = submit(store, "one").job_id
    live_job = submit(store, "two").job_id
    assert jobs.claim(store, dead_job, dead_owner, 600)
    assert jobs.claim(store, live_job, jobs.worker_id(), 600)

    recoverable = jobs.recoverable_jobs(store, 600)
    assert dead_job in recoverable
    assert live_job not in recoverable
    assert jobs.claim(store, dead_job, ELSEWHERE_B, 600)  # taken over despite the long lease
    assert not jobs.claim(store, live_job, ELSEWHERE_B, 600)


# ---------------------------------------------------------------- review signals


def make_pull_request(store: Store) -> tuple[int, int]:
    """A pull request with two revisions by different models; returns (pr id, newest rev id)."""
    sub = submit(store)
    with store.session() as s:
        pr = PullRequest(request_id=sub.request_id, forge="local", repo="/tmp/repo",
                         branch="codeloop/1", base_branch="main", title="Add shout",
                         body="body", model_version="model-pr")
        s.add(pr)
        s.flush()
        revs = [
            Revision(pull_request_id=pr.id, number=n, job_id=sub.job_id, commit_sha=f"{n}" * 40,
                     diff="", diff_stat="", model_version=model, trigger=trigger)
            for n, model, trigger in [(1, "model-a", "initial"), (2, "model-b", "review")]
        ]
        s.add_all(revs)
        s.flush()
        return pr.id, revs[-1].id


def test_signal_is_stored_once_and_linked_to_the_newest_revision(store):
    pr_id, newest = make_pull_request(store)
    signal_id, created = record_signal(store, pr_id, kind="approved", source="github",
                                       external_id="review-7", author="alice")
    assert created
    assert record_signal(store, pr_id, kind="approved", source="github",
                         external_id="review-7", author="alice") == (signal_id, False)
    assert count(store, ReviewSignal) == 1
    with store.session() as s:
        signal = s.get(ReviewSignal, signal_id)
        assert (signal.revision_id, signal.model_version) == (newest, "model-b")

    with pytest.raises(SignalError, match="unknown review signal"):
        record_signal(store, pr_id, kind="liked", source="github", external_id="review-8")
    assert count(store, ReviewSignal) == 1


# ---------------------------------------------------------------- stage history


def test_done_stage_is_a_checkpoint(store):
    job_id = submit(store).job_id
    notifier = RecordingNotifier()
    calls = []

    def generate():
        calls.append(1)
        return {"answer": 42}

    assert Stages(store, job_id, notifier).run("a", generate) == {"answer": 42}
    assert Stages(store, job_id, notifier).run("a", generate) == {"answer": 42}  # a resumed run
    assert calls == [1]
    assert notifier.calls == [("stage", job_id, "a")]
    [row] = stage_rows(store, job_id)
    assert (row.name, row.state, row.output, row.error) == ("a", "done", {"answer": 42}, None)
    assert row.seconds is not None and row.seconds >= 0
    assert row.finished_at is not None and row.finished_at >= row.started_at


def test_failed_stage_is_recorded_and_can_be_retried(store):
    job_id = submit(store).job_id
    stages = Stages(store, job_id, RecordingNotifier())

    def crash():
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        stages.run("b", crash)
    [row] = stage_rows(store, job_id)
    assert (row.state, row.error) == ("failed", "model crashed")
    assert row.finished_at is not None and row.seconds is not None

    assert stages.run("b", lambda: {"ok": True}) == {"ok": True}
    assert [r.state for r in stage_rows(store, job_id)] == ["failed", "done"]


def test_stale_running_stage_becomes_interrupted(store):
    job_id = submit(store).job_id
    with store.session() as s:  # left behind by a worker that died mid-stage
        s.add(JobStage(job_id=job_id, name="a", state="running"))
    assert Stages(store, job_id, RecordingNotifier()).run("a", lambda: {"x": 1}) == {"x": 1}
    assert [(r.name, r.state) for r in stage_rows(store, job_id)] == [
        ("a", "interrupted"), ("a", "done"),
    ]



def test_migrations_create_exactly_what_the_models_declare(db_url):
    """A model changed without a migration (or the reverse) fails here, not in production."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    store = Store(db_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    store.close()
    assert diff == []
