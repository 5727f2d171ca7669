"""Stage checkpoints: each stage runs once per job, and its `done` row is what a resumed job
reads back instead of running it again. Also the stages' names as people read them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bot import jobs
from bot.leases import failpoint
from bot.pipeline.base import JobCancelled
from bot.ports import Notifier
from bot.store.db import Store
from bot.store.models import JobStage, utcnow

log = logging.getLogger(__name__)

# The one copy of the stage labels: the log, the terminal, Slack and the dashboard read them
# here (a stage's own progress line, `detail`, says more where the pipeline knows more).
STAGE_LABELS = {
    "workspace": "reading the repository",
    "context": "finding the files that matter",
    "prompt": "writing the prompt",
    "publish": "opening the pull request",
}


def stage_label(name: str) -> str:
    """A stage's name as people read it (`generate-2` is "generating (attempt 2)")."""
    base, _, attempt = name.partition("-")
    if base == "generate" and attempt:
        return f"generating (attempt {attempt})"
    if base == "validate" and attempt:
        return f"validating (attempt {attempt})"
    return STAGE_LABELS.get(name, name)


class Checkpoint(Protocol):
    """A typed stage result: stored as the stage's JSON output, read back on resume."""

    def to_json(self) -> dict: ...


R = TypeVar("R")


class Stages:
    """Runs named stages once per job; a `done` row is the checkpoint a resume reads back."""

    def __init__(self, store: Store, job_id: int, notifier: Notifier, failpoint: str | None = None):
        self.store = store
        self.job_id = job_id
        self.notifier = notifier
        self.failpoint = failpoint

    def done(self, name: str) -> dict | None:
        with self.store.session() as s:
            row = s.scalar(
                select(JobStage).where(
                    JobStage.job_id == self.job_id, JobStage.name == name, JobStage.state == "done"
                )
            )
            return None if row is None else dict(row.output)

    def typed(
        self,
        name: str,
        result: Callable[[dict], R],
        fn: Callable[[], Checkpoint],
        detail: str = "",
        on_done: Callable[[Session, dict], None] | None = None,
    ) -> R:
        """`run` for a stage whose result is a dataclass: `fn` returns it, `result` (its
        `from_json`) reads it back, from this run or from the checkpoint."""
        return result(self.run(name, lambda: fn().to_json(), detail, on_done))

    def run(
        self,
        name: str,
        fn: Callable[[], dict],
        detail: str = "",
        on_done: Callable[[Session, dict], None] | None = None,
    ) -> dict:
        cached = self.done(name)
        if cached is not None:
            log.info("job %s: stage %s already done, reusing its result", self.job_id, name)
            return cached
        if jobs.is_cancelled(self.store, self.job_id):
            raise JobCancelled()
        self.notifier.stage(self.job_id, name, detail)
        with self.store.session() as s:
            # A `running` row left by a worker that died is history, not a checkpoint.
            s.execute(
                update(JobStage)
                .where(JobStage.job_id == self.job_id, JobStage.name == name,
                       JobStage.state == "running")
                .values(state="interrupted")
            )
            row = JobStage(job_id=self.job_id, name=name, state="running")
            s.add(row)
            s.flush()
            row_id = row.id
        failpoint(self.failpoint, name)
        started = time.perf_counter()
        try:
            output = fn()
        except BaseException as exc:
            with self.store.session() as s:
                row = s.get(JobStage, row_id)
                row.state, row.error = "failed", str(exc)[:4000]
                row.finished_at, row.seconds = utcnow(), time.perf_counter() - started
            raise
        with self.store.session() as s:
            row = s.get(JobStage, row_id)
            row.state, row.output = "done", output
            row.finished_at, row.seconds = utcnow(), time.perf_counter() - started
            if on_done is not None:
                on_done(s, output)  # same transaction as the checkpoint: happens once
        return output
