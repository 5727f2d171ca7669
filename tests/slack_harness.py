"""codeloop with Slack, all real parts on loopback: the Bolt app on codeloop's web server
(uvicorn on a free port), a huey queue on SQLite with a thread consumer, the store, the
local forge, and the Slack Web API client pointed at tests/slack_server.py.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from itertools import count

import httpx
import uvicorn
from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from bot.forges.local import LocalForge
from bot.runtime import build_queue, build_runtime, start_delivery_consumer
from bot.settings import Settings, SlackSettings
from bot.slack import app as slack_app
from tests import slack_signing as signing
from bot.store.models import Delivery, Job, Request
from bot.web import WebContext, create_app
from tests.slack_server import SlackAPIServer

SECRET = "test-signing-secret-0123456789abcdef"
ADMIN = "UADMIN"
ALICE = "UALICE"


def slack_settings(api_url: str, **extra) -> SlackSettings:
    return SlackSettings(
        bot_token="xoxb-test-token", signing_secret=SECRET, app_token="xapp-test-token",
        api_url=api_url, admins=[ADMIN], github_logins={ALICE: "alice-gh"},
        update_interval_seconds=extra.pop("update_interval_seconds", 0.5), **extra,
    )


class WebServer:
    """A Starlette app served by uvicorn on 127.0.0.1:<free port>, in a thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def start(self) -> WebServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Harness:
    def __init__(self, settings: Settings, slack: SlackAPIServer, backend) -> None:
        self.settings = settings
        self.slack = slack
        self.runtime = build_runtime(settings, backend=backend, forge=LocalForge())
        self.store = self.runtime.store
        self.huey = build_queue(settings, lambda: self.runtime)
        self.huey.codeloop_runtime()  # sets runtime.enqueue_job
        ctx = WebContext(settings=settings, store=self.store,
                         enqueue_delivery=self.huey.codeloop_handle_delivery)
        self.web = WebServer(create_app(ctx, [slack_app.routes]))
        self.http = httpx.Client(base_url=self.web.url, timeout=30)
        self._ids = count(1)
        self._signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM,
                                                            signal.SIGHUP)}
        # As `codeloop worker` runs them: the jobs consumer with the default worker count
        # (one), and the deliveries consumer beside it.
        self.consumer = self.huey.create_consumer(workers=settings.queue.workers,
                                                  worker_type="thread", periodic=False,
                                                  check_worker_health=False)
        self.delivery_consumer = None

    def start(self) -> Harness:
        self.web.start()
        self.consumer.start()
        self.delivery_consumer = start_delivery_consumer(self.huey)
        for sig, handler in self._signals.items():  # the consumer set its own; keep pytest's
            signal.signal(sig, handler)
        return self

    def stop(self) -> None:
        self.http.close()
        self.web.stop()
        self.consumer.stop(graceful=True)
        self.delivery_consumer.stop(graceful=True)
        self.runtime.close()

    # -------------------------------------------------------------- sending as Slack

    def post(self, body: str, content_type: str, *, secret: str = SECRET,
             timestamp: int | None = None, retry: int | None = None) -> httpx.Response:
        headers = signing.signed_headers(secret, body, timestamp, content_type)
        if retry:
            headers["X-Slack-Retry-Num"] = str(retry)
            headers["X-Slack-Retry-Reason"] = "http_timeout"
        return self.http.post(slack_app.EVENTS_PATH, content=body, headers=headers)

    def event(self, event: dict, event_id: str | None = None, **kw) -> httpx.Response:
        event_id = event_id or f"Ev{next(self._ids):06d}"
        return self.post(signing.event_body(event, event_id), "application/json", **kw)

    def message(self, text: str, *, channel: str, user: str = ALICE, ts: str | None = None,
                thread_ts: str | None = None, event_id: str | None = None,
                kind: str = "message", **kw) -> tuple[httpx.Response, str]:
        ts = ts or f"1800000000.{next(self._ids):06d}"
        event = {"type": kind, "channel": channel, "user": user, "text": text, "ts": ts,
                 "channel_type": "channel", "event_ts": ts}
        if thread_ts:
            event["thread_ts"] = thread_ts
        return self.event(event, event_id, **kw), ts

    def command(self, text: str, *, channel: str, user: str) -> httpx.Response:
        n = next(self._ids)
        body = signing.command_body(text, channel=channel, user=user, trigger_id=f"trig.{n}",
                                    response_url=f"{self.slack.hooks_url}response-{n}")
        return self.post(body, "application/x-www-form-urlencoded")

    def click(self, action_id: str, job_id: int, *, channel: str, user: str,
              message_ts: str = "1.0") -> httpx.Response:
        body = signing.action_body(action_id, str(job_id), channel=channel, user=user,
                                   message_ts=message_ts, trigger_id=f"trig.{next(self._ids)}")
        return self.post(body, "application/x-www-form-urlencoded")

    # -------------------------------------------------------------- looking

    def count(self, model) -> int:
        with self.store.session() as s:
            return s.scalar(select(func.count()).select_from(model))

    def job(self, job_id: int) -> Job:
        with self.store.session() as s:
            return s.get(Job, job_id)

    def wait_job(self, job_id: int, states=("succeeded", "failed", "cancelled"),
                 timeout: float = 120) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job is not None and job.state in states:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not reach {states}: {self.job(job_id)}")

    def wait_deliveries_handled(self, timeout: float = 30) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.store.session() as s:
                rows = s.scalars(select(Delivery).order_by(Delivery.id)).all()
            if rows and all(r.state not in ("received", "handling") for r in rows):
                return rows
            time.sleep(0.05)
        raise AssertionError("deliveries were not handled in time")

    def requests(self) -> list[Request]:
        with self.store.session() as s:
            return s.scalars(select(Request).options(selectinload(Request.jobs))
                             .order_by(Request.id)).all()


def final_texts(slack: SlackAPIServer) -> list[str]:
    """Every text the progress message showed (post and updates), in order, blocks included."""
    out = []
    for call in slack.calls:
        if call.method in ("chat.postMessage", "chat.update") and call.status == 200:
            blocks = call.params.get("blocks") or []
            out.append(call.params.get("text", "") + "\n" + json.dumps(blocks))
    return out
