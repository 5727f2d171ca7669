"""Progress goes back where the request came from: one notifier per source, chosen per job."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from bot.ports import Notifier
from bot.scrub import Scrubber
from bot.store.db import Store
from bot.store.models import Job, Request

log = logging.getLogger(__name__)


class RoutingNotifier:
    """Sends a job's progress to the notifier of its request's source (slack, github, cli).

    A notifier that fails is logged and never fails the job: progress is best effort,
    the job's state in the store is the truth.
    """

    def __init__(self, store: Store, by_source: dict[str, Notifier], default: Notifier,
                 secrets: Iterable[str] = ()):
        self.store = store
        self.by_source = by_source
        self.default = default
        self.scrub = Scrubber(secrets)  # a last wall before text reaches people

    def _target(self, job_id: int) -> Notifier:
        with self.store.session() as s:
            job = s.get(Job, job_id)
            source = s.get(Request, job.request_id).source if job else None
        return self.by_source.get(source or "", self.default)

    def stage(self, job_id: int, stage: str, detail: str = "") -> None:
        try:
            self._target(job_id).stage(job_id, stage, self.scrub(detail))
        except Exception:  # noqa: BLE001 - progress must not fail a job
            log.exception("job %s: progress update failed", job_id)

    def finished(self, job_id: int, text: str, ok: bool) -> None:
        try:
            self._target(job_id).finished(job_id, self.scrub(text), ok)
        except Exception:  # noqa: BLE001
            log.exception("job %s: final message failed", job_id)
