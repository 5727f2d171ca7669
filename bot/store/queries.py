"""Read-only queries the command line prints from: rows come back loaded and detached
(the store's sessions keep attributes after commit), so callers format them freely."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from bot.store.db import Store
from bot.store.models import EditFormatStat, Job, PullRequest, Request


def job_and_request(store: Store, job_id: int, request_id: int) -> tuple[Job, Request]:
    with store.session() as s:
        return s.get(Job, job_id), s.get(Request, request_id)


def pull_requests(store: Store) -> list[PullRequest]:
    """Every pull request, oldest first, with its revisions."""
    with store.session() as s:
        return list(s.scalars(
            select(PullRequest).options(selectinload(PullRequest.revisions))
            .order_by(PullRequest.id)
        ))


def local_pull_request(store: Store, number: int) -> PullRequest | None:
    """Pull request `number` of the local forge, with its revisions and review signals."""
    with store.session() as s:
        return s.scalar(
            select(PullRequest)
            .options(selectinload(PullRequest.revisions), selectinload(PullRequest.signals))
            .where(PullRequest.number == number, PullRequest.forge == "local")
        )


def job_state_counts(store: Store) -> list[tuple[str, int]]:
    with store.session() as s:
        return [(state, count) for state, count in
                s.execute(select(Job.state, func.count()).group_by(Job.state))]


def edit_format_stats(store: Store) -> list[EditFormatStat]:
    with store.session() as s:
        return list(s.scalars(select(EditFormatStat)))
