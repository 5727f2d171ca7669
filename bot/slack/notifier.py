"""A job's progress in its Slack thread: one message, edited in place as stages pass.

The first stage posts the message (with a Cancel button) and stores its ts, so any worker
process edits the same message. Later stages edit it with `chat.update`, at most once per
`settings.slack.update_interval_seconds`: a stage change inside that window replaces the
pending text and is sent when the window ends, so a fast job does not send a burst. The end
(pull request link, diff stat and validation, or the reason and a Retry button) is sent at
once and always wins over a pending edit. Content is read from the store (bot.slack.messages
decides it); this class only sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from slack_sdk import WebClient
from sqlalchemy import select

from bot.slack import messages
from bot.store.db import Store
from bot.store.models import Job, JobStage, SlackJobMessage, utcnow

log = logging.getLogger(__name__)


@dataclass
class _JobState:
    last_sent: float = float("-inf")
    pending: messages.Reply | None = None
    timer: threading.Timer | None = None
    done: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class SlackNotifier:
    def __init__(self, store: Store, client: WebClient, *, interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.client = client
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[int, _JobState] = {}

    # -------------------------------------------------------------- the Notifier port

    def stage(self, job_id: int, stage: str, detail: str = "") -> None:
        view, where = self._read(job_id, current=detail or messages.stage_label(stage))
        if where is None:
            return
        self._send(job_id, where, messages.progress(view), final=False)

    def finished(self, job_id: int, text: str, ok: bool) -> None:
        view, where = self._read(job_id, current=None)
        if where is None:
            return
        if view.state == "succeeded" and ok:
            reply = messages.succeeded(view)
        elif view.state == "cancelled":
            reply = messages.cancelled(view)
        else:
            if not view.error:
                view = messages.JobView(**{**view.__dict__, "error": text})
            reply = messages.failed(view)
        self._send(job_id, where, reply, final=True)
        self._notify_requester(job_id, where, view)

    def _notify_requester(self, job_id: int, where: tuple[str, str | None],
                          view: messages.JobView) -> None:
        """Editing the progress message notifies nobody: tell the requester in the thread."""
        with self.store.session() as s:
            job = s.get(Job, job_id)
            user = (job.request.reply_to or {}).get("user") if job else None
        channel, thread_ts = where
        try:
            self.client.chat_postMessage(channel=channel, thread_ts=thread_ts,
                                         text=messages.finished_notice(user, view).text)
        except Exception:  # noqa: BLE001 - the result is in the edited message either way
            log.exception("job %s: could not notify the requester", job_id)

    # -------------------------------------------------------------- reading

    def _read(self, job_id: int, current: str | None):
        with self.store.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return None, None
            req = job.request
            reply_to = req.reply_to or {}
            if not reply_to.get("channel"):
                return None, None
            rows = s.scalars(
                select(JobStage).where(JobStage.job_id == job_id, JobStage.state == "done")
                .order_by(JobStage.id)
            ).all()
            lines = [messages.StageLine(messages.stage_label(r.name), r.seconds or 0.0)
                     for r in rows]
            if current is not None:
                lines.append(messages.StageLine(current, None))
            view = messages.JobView(
                job_id=job.id, request_id=req.id, repo=req.repo, kind=job.kind, state=job.state,
                started=job.created_at, now=utcnow(), stages=tuple(lines),
                result=dict(job.result or {}), error=job.error,
            )
            return view, (reply_to["channel"], reply_to.get("thread_ts"))

    def _message_ts(self, job_id: int) -> tuple[str, str] | None:
        with self.store.session() as s:
            row = s.get(SlackJobMessage, job_id)
            return (row.channel_id, row.ts) if row else None

    # -------------------------------------------------------------- sending

    def _send(self, job_id: int, where: tuple[str, str | None], reply: messages.Reply,
              *, final: bool) -> None:
        with self._lock:
            st = self._jobs.setdefault(job_id, _JobState())
            if final:
                st.done = True
                st.pending = None
                if st.timer is not None:
                    st.timer.cancel()
                    st.timer = None
            else:
                wait = st.last_sent + self.interval - self.clock()
                if wait > 0 and self._message_ts(job_id) is not None:
                    st.pending = reply  # coalesced: the newest text goes out when the window ends
                    if st.timer is None:
                        st.timer = threading.Timer(wait, self._flush, args=(job_id, where))
                        st.timer.daemon = True
                        st.timer.start()
                    return
        with st.send_lock:
            if not final and st.done:
                return
            self._deliver(job_id, where, reply)
            st.last_sent = self.clock()
        if final:
            with self._lock:
                self._jobs.pop(job_id, None)

    def _flush(self, job_id: int, where: tuple[str, str | None]) -> None:
        with self._lock:
            st = self._jobs.get(job_id)
            if st is None:
                return
            st.timer = None
            reply, st.pending = st.pending, None
        if reply is None:
            return
        try:
            with st.send_lock:
                if st.done:
                    return
                self._deliver(job_id, where, reply)
                st.last_sent = self.clock()
        except Exception:  # noqa: BLE001 - progress is best effort
            log.exception("job %s: coalesced progress update failed", job_id)

    def _deliver(self, job_id: int, where: tuple[str, str | None], reply: messages.Reply) -> None:
        found = self._message_ts(job_id)
        if found is not None:
            channel, ts = found
            self.client.chat_update(channel=channel, ts=ts, text=reply.text, blocks=reply.blocks)
            return
        channel, thread_ts = where
        resp = self.client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=reply.text,
                                            blocks=reply.blocks)
        with self.store.session() as s:
            s.add(SlackJobMessage(job_id=job_id, channel_id=resp["channel"], ts=resp["ts"]))
