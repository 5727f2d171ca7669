"""Durable jobs: requests and jobs in the store, claimed with a lease, carried by huey.

Durability lives in the store, not in the queue: a job row exists before it is enqueued,
a worker claims it with an atomic UPDATE and keeps a heartbeat on its lease, and each
pipeline stage checkpoints its output (bot.pipeline.Stages). A worker killed mid-job
leaves a job whose lease runs out (or whose owner process is gone); any worker's recovery
sweep re-enqueues it, and the resumed run skips the stages that were done. Duplicate
enqueues are harmless: only one claim can win.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update

from bot import leases
from bot.store.db import Store, insert_or_get
from bot.store.models import Job, Request, utcnow

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """The requirement cannot be accepted; the message is meant for the requester."""


@dataclass(frozen=True)
class Submitted:
    request_id: int
    job_id: int
    created: bool  # False when the same request was seen before


def idempotency_key(source: str, repo: str, requirement: str, delivery: str | None = None) -> str:
    """Same delivery (or, without one, same source + repo + text) → same key → one job."""
    basis = delivery or f"{repo}\n{requirement.strip()}"
    return f"{source}:" + hashlib.sha256(basis.encode()).hexdigest()[:32]


def clean_requirement(text: str | None, max_bytes: int) -> tuple[str, bool]:
    """Strip and bound a requirement; returns (text, truncated)."""
    text = (text or "").strip()
    if not text:
        raise BadRequest("the requirement is empty: say what the change should do")
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text, False
    cut = raw[:max_bytes].decode(errors="ignore").rstrip()
    note = f"\n\n[requirement truncated by codeloop: {len(raw):,} bytes, limit {max_bytes:,}]"
    return cut + note, True


def submit(
    store: Store,
    *,
    source: str,
    repo: str,
    requirement: str,
    max_bytes: int,
    requester: str | None = None,
    reply_to: dict | None = None,
    delivery: str | None = None,
) -> Submitted:
    """Record a request and its job, once per idempotency key."""
    text, truncated = clean_requirement(requirement, max_bytes)
    key = idempotency_key(source, repo, text, delivery)
    with store.session() as s:
        existing = s.scalar(select(Request).where(Request.idempotency_key == key))
        if existing is not None:
            job = existing.jobs[0]
            return Submitted(existing.id, job.id, created=False)
    with store.session() as s:
        request_id, created = insert_or_get(s, Request, dict(
            idempotency_key=key, source=source, repo=repo, requirement=text,
            truncated=truncated, requester=requester, reply_to=reply_to or {},
        ), key=("idempotency_key",))
        if not created:  # a concurrent delivery of the same request won the insert
            return Submitted(request_id, s.get(Request, request_id).jobs[0].id, created=False)
        job = Job(key=f"create:{key}", request_id=request_id, kind="create")
        s.add(job)
        s.flush()
        return Submitted(request_id, job.id, created=True)


def submit_revision(
    store: Store, *, request_id: int, pull_request_id: int, feedback: str, key: str
) -> tuple[int, bool]:
    """A job that revises an open pull request; `key` dedupes (e.g. the review's id)."""
    return add_job(store, key=key, request_id=request_id, kind="revise",
                   pull_request_id=pull_request_id, feedback=feedback)


def add_job(
    store: Store, *, key: str, request_id: int, kind: str,
    pull_request_id: int | None = None, feedback: str | None = None,
) -> tuple[int, bool]:
    """A further job for an existing request, once per `key`: (job id, created)."""
    with store.session() as s:
        existing = s.scalar(select(Job.id).where(Job.key == key))
        if existing is not None:
            return existing, False
    with store.session() as s:  # a concurrent caller with the same key may win the insert
        return insert_or_get(s, Job, dict(key=key, request_id=request_id, kind=kind,
                                          pull_request_id=pull_request_id, feedback=feedback),
                             key=("key",))


# ---------------------------------------------------------------- leases


def worker_id() -> str:
    return leases.worker_id()


def _boot_id() -> str:
    return leases.boot_id()


def _owner_is_dead(owner: str | None) -> bool:
    return leases.owner_is_dead(owner)


def claim(store: Store, job_id: int, owner: str, lease_seconds: int) -> bool:
    """Atomically take a job that is queued, or running under an expired or dead lease.

    A queued job with `lease_until` in the future was deferred (`defer`) and waits until then.
    """
    now = utcnow()
    with store.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in ("queued", "running"):
            return False
        if job.state == "queued" and job.lease_until is not None and job.lease_until > now:
            return False
        stale = job.state == "running" and (
            (job.lease_until is not None and job.lease_until < now)
            or (job.lease_owner != owner and _owner_is_dead(job.lease_owner))
        )
        if job.state == "running" and not stale:
            return False
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == job.state, Job.runs == job.runs)
            .values(
                state="running",
                lease_owner=owner,
                lease_until=now + timedelta(seconds=lease_seconds),
                runs=Job.runs + 1,
                started_at=job.started_at or now,
            )
        )
        return result.rowcount == 1


def renew(store: Store, job_id: int, owner: str, lease_seconds: int) -> bool:
    with store.session() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        )
        return result.rowcount == 1


def finish(store: Store, job_id: int, owner: str, *, state: str, error: str | None, result: dict) -> None:
    with store.session() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner)
            .values(
                state=state,
                error=error,
                result=result,
                finished_at=utcnow(),
                lease_until=None,
            )
        )


def defer(store: Store, job_id: int, owner: str, *, delay_seconds: float, note: str) -> bool:
    """Give a running job back to the queue, not to be claimed before `delay_seconds` pass.

    Its checkpointed stages stay done; the next run resumes after them.
    """
    with store.session() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == "running")
            .values(
                state="queued",
                lease_owner=None,
                lease_until=utcnow() + timedelta(seconds=delay_seconds),
                error=note,
            )
        )
        return result.rowcount == 1


class Heartbeat(leases.Heartbeat):
    """Renews a job's lease on a background thread while the job runs."""

    def __init__(self, store: Store, job_id: int, owner: str, lease_seconds: int):
        super().__init__(lambda: renew(store, job_id, owner, lease_seconds), lease_seconds,
                         f"job {job_id}")


def recoverable_jobs(store: Store, lease_seconds: int) -> list[int]:
    """Jobs to (re-)enqueue: queued for a while, or running under an expired or dead lease."""
    now = utcnow()
    with store.session() as s:
        rows = s.execute(
            select(Job.id, Job.state, Job.lease_owner, Job.lease_until, Job.created_at).where(
                or_(Job.state == "queued", Job.state == "running")
            )
        ).all()
    out = []
    for job_id, state, owner, until, created in rows:
        if state == "queued" and created < now - timedelta(seconds=5):
            if until is None or until < now:  # a deferred job waits for its time
                out.append(job_id)
        elif state == "running" and ((until is not None and until < now) or _owner_is_dead(owner)):
            out.append(job_id)
    return out


def cancel(store: Store, job_id: int) -> bool:
    with store.session() as s:
        result = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(("queued", "running")))
            .values(state="cancelled", finished_at=utcnow(), error="cancelled")
        )
        return result.rowcount == 1


def is_cancelled(store: Store, job_id: int) -> bool:
    with store.session() as s:
        return s.scalar(select(Job.state).where(Job.id == job_id)) == "cancelled"

