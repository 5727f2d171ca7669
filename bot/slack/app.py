"""The slack-bolt app: verify, store, enqueue, acknowledge. Nothing else runs here.

Served over HTTP at `POST /slack/events` on codeloop's web server (`routes`), or over
Socket Mode (`run_socket_mode`) for workspaces without a public URL. Every listener
records the payload as a delivery (one INSERT; Slack's retries carry the same event_id and
hit the unique constraint) and enqueues its id for the worker (bot.slack.handler).

Over HTTP, the route checks the request before anything parses it: the size, then the
signature (v0 HMAC over the raw bytes, with a numeric timestamp within five minutes);
forged, stale or malformed requests get 401 and nothing is stored. Only then is the body
parsed, and a body that is not JSON / a form, or is nested absurdly deep, gets 400.
`app_rate_limited` (Slack telling the app it is over its event quota) and other apps'
buttons are acknowledged, not 404.

Who the bot is (`auth.test`) is asked in the background (`SlackIdentity`), never at start:
with Slack's Web API unreachable the web server still starts, the GitHub route still
serves, Slack events are still stored, and `/readyz` says Slack is degraded until
`auth.test` answers (retried every `slack.auth_retry_seconds`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

from slack_bolt import App
from slack_bolt.authorization import AuthorizeResult
from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)

from bot import deliveries
from bot.settings import Settings
from bot.slack import events
from bot.store.db import Store

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
MAX_BODY_BYTES = 1024 * 1024  # Slack's requests are a few KB; nothing legitimate is near this


class SlackNotConfigured(RuntimeError):
    """A setting Slack needs is missing; the message names it."""


@dataclass(frozen=True)
class BotIdentity:
    """Who the bot is in Slack (what `auth.test` answers). Given to `build_app`, the app
    needs no Web API call at all (benchmarks, air-gapped checks); otherwise Bolt asks
    `auth.test` once at start-up."""

    user_id: str
    bot_id: str
    team_id: str | None = None


class SlackIdentity:
    """The bot's identity from `auth.test`, asked in a background thread until Slack answers.

    `problem` is None once known, else why not (shown by `/readyz`)."""

    def __init__(self, client: WebClient, known: BotIdentity | None = None,
                 retry_seconds: float = 30.0):
        self.client = client
        self.identity = known
        self.retry_seconds = retry_seconds
        self.problem: str | None = None if known else "auth.test not answered yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        try:
            answer = self.client.auth_test()
        except Exception as exc:  # noqa: BLE001 - Slack unreachable or refusing: degraded
            error = getattr(getattr(exc, "response", None), "get", lambda *_: None)("error")
            self.problem = (f"Slack auth.test failed ({error or type(exc).__name__}); "
                            f"retrying every {self.retry_seconds:g} s")
            log.warning("slack: %s", self.problem)
            return False
        self.identity = BotIdentity(user_id=answer.get("user_id"), bot_id=answer.get("bot_id"),
                                    team_id=answer.get("team_id"))
        if self.problem is not None and self._thread is not None:
            log.info("slack: auth.test answered; Slack is available again")
        self.problem = None
        return True

    def start(self) -> SlackIdentity:
        if self.identity is not None or self._thread is not None:
            return self

        def loop() -> None:
            while not self.refresh() and not self._stop.wait(self.retry_seconds):
                pass

        self._thread = threading.Thread(target=loop, name="slack-auth-test", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


def web_client(settings: Settings) -> WebClient:
    """The Web API client: retries on `ratelimited` (429, Retry-After) and connection errors."""
    token = settings.slack.bot_token
    if token is None:
        raise SlackNotConfigured("CODELOOP_SLACK__BOT_TOKEN is not set (the bot token, xoxb-…)")
    return WebClient(
        token=token.get_secret_value(),
        base_url=settings.slack.api_url,
        timeout=int(settings.slack.timeout_seconds),
        retry_handlers=[
            ConnectionErrorRetryHandler(max_retry_count=2),
            RateLimitErrorRetryHandler(max_retry_count=settings.slack.rate_limit_retries),
        ],
    )


def build_app(
    settings: Settings,
    store: Store,
    enqueue_delivery: Callable[[int], object],
    client: WebClient | None = None,
    *,
    socket_mode: bool = False,
    bot_identity: BotIdentity | None = None,
    identity: SlackIdentity | None = None,
    recorder: deliveries.Recorder | None = None,
) -> App:
    """A Bolt app whose listeners store the delivery and enqueue it, then acknowledge.

    Over HTTP the route (`routes`) has verified the signature before Bolt sees a request,
    so Bolt's own verification is off; it makes no Web API call at start either."""
    secret = settings.slack.signing_secret
    if secret is None and not socket_mode:
        raise SlackNotConfigured(
            "CODELOOP_SLACK__SIGNING_SECRET is not set (Basic Information → Signing Secret)"
        )
    client = client or web_client(settings)
    if identity is None:
        identity = SlackIdentity(client, bot_identity, settings.slack.auth_retry_seconds).start()

    def authorize(team_id=None, **_):
        known = identity.identity  # None while Slack is unreachable: events are still stored
        return AuthorizeResult(enterprise_id=None, team_id=(known and known.team_id) or team_id,
                               bot_token=client.token, bot_id=known and known.bot_id,
                               bot_user_id=known and known.user_id)

    app = App(
        signing_secret=secret.get_secret_value() if secret else "socket-mode",
        client=client,
        # The listener's insert finishes before the answer: an acknowledged event is stored.
        process_before_response=True,
        request_verification_enabled=False,  # HTTP: checked by the route; Socket Mode: none
        token_verification_enabled=False,
        authorize=authorize,
        logger=logging.getLogger("bot.slack.bolt"),
    )
    app.codeloop_identity = identity  # type: ignore[attr-defined]

    def listener_for(kind: str) -> Callable:
        def listener(ack, body: dict) -> None:
            payload = {k: v for k, v in body.items() if k != "token"}  # legacy verification token
            key = events.delivery_id(kind, payload)
            if recorder is not None:  # stored with the others arriving now; enqueued after
                recorder.record(source="slack", delivery_id=key, event=kind, payload=payload)
            else:
                rec = deliveries.record(store, source="slack", delivery_id=key, event=kind,
                                        payload=payload)
                if rec.enqueue:
                    enqueue_delivery(rec.id)
            ack()

        return listener

    for name in events.SUBSCRIBED_EVENTS:
        app.event(name)(listener_for(events.EVENT))
    app.command(events.COMMAND_NAME)(listener_for(events.COMMAND))
    for action_id in events.ACTIONS:
        app.action(action_id)(listener_for(events.ACTION))

    def not_ours(ack, body: dict) -> None:  # another app's button in a shared message
        ack()

    app.action(re.compile(".*"))(not_ours)
    return app


def edge_kind(payload: dict, me: BotIdentity | None) -> str | None:
    """What the edge does with a verified, parsed request: store it as a delivery of this
    kind (events.EVENT / COMMAND / ACTION), acknowledge it only (None: handshakes, the bot's
    own messages, events, commands and buttons that are not codeloop's), or "bolt" (a
    request type codeloop has no listener for; Bolt answers it as it always has)."""
    kind = payload.get("type")
    if payload.get("ssl_check") is not None or kind == "url_verification":
        return None
    if kind == "event_callback":
        event = payload.get("event")
        if not isinstance(event, dict) or event.get("type") not in events.SUBSCRIBED_EVENTS:
            return None
        if me is not None and ((me.bot_id and event.get("bot_id") == me.bot_id)
                               or (me.user_id and event.get("user") == me.user_id)):
            return None  # the bot's own messages (Bolt's "ignoring self events")
        return events.EVENT
    if "command" in payload and kind is None:
        return events.COMMAND if payload.get("command") == events.COMMAND_NAME else None
    if kind == "block_actions":
        actions = payload.get("actions")
        first = actions[0] if isinstance(actions, list) and actions else None
        if isinstance(first, dict) and first.get("action_id") in events.ACTIONS:
            return events.ACTION
        return None  # another app's button
    return "bolt"


class BadRequest(ValueError):
    """A request that passed the signature check but is not one Slack sends."""


def _parse(content_type: str, body: bytes) -> dict:
    """The body as Slack sent it: JSON (events) or a form (commands, `payload=` for clicks)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("the body is not UTF-8") from exc
    kind = content_type.split(";", 1)[0].strip().lower()
    try:
        if kind == "application/json":
            data = json.loads(text)
        else:
            form = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
            data = json.loads(form["payload"]) if "payload" in form else form
    except RecursionError as exc:
        raise BadRequest("the body is nested too deeply") from exc
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body is not an object")
    return data


def routes(ctx) -> list:
    """`POST /slack/events` for bot.web. Empty when Slack is not configured."""
    from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.routing import Route

    from slack_sdk.signature import SignatureVerifier
    from starlette.responses import JSONResponse, Response

    from bot.web import TooLarge, read_body

    settings: Settings = ctx.settings
    if settings.slack.signing_secret is None or settings.slack.bot_token is None:
        return []
    app = build_app(settings, ctx.store, ctx.enqueue_delivery,
                    client=ctx.extras.get("slack_client"),
                    bot_identity=ctx.extras.get("slack_bot_identity"), recorder=ctx.recorder)
    identity: SlackIdentity = app.codeloop_identity
    ctx.extras.setdefault("degraded", {})["slack"] = lambda: identity.problem
    ctx.extras["slack_identity"] = identity
    verifier = SignatureVerifier(settings.slack.signing_secret.get_secret_value())

    def refuse(status: int, error: str) -> JSONResponse:
        return JSONResponse({"ok": False, "error": error}, status_code=status)

    async def slack_events(request: Request):
        try:
            body = await read_body(request, MAX_BODY_BYTES)
        except TooLarge:
            return refuse(413, "request too large")
        timestamp = request.headers.get("x-slack-request-timestamp", "")
        signature = request.headers.get("x-slack-signature", "")
        # The raw bytes are verified before anything reads them.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) < 12
                and signature and verifier.is_valid(body, timestamp, signature)):
            return refuse(401, "invalid or missing signature")
        try:
            payload = _parse(request.headers.get("content-type", ""), body)
        except BadRequest as exc:
            return refuse(400, str(exc))
        if payload.get("type") == "app_rate_limited":
            log.warning("slack: Slack is dropping this app's events (app_rate_limited, minute "
                        "%s); they are not redelivered", payload.get("minute_rate_limited"))
            return JSONResponse({"ok": True})
        kind = edge_kind(payload, identity.identity)
        if kind is None:  # Slack's handshakes and everything codeloop does not subscribe to
            if payload.get("type") == "url_verification":
                return JSONResponse({"challenge": str(payload.get("challenge", ""))})
            return Response(status_code=200)
        if kind == "bolt":  # anything else Slack may send: Bolt's own answer
            response = await run_in_threadpool(app.dispatch, to_bolt_request(request, body))
            return to_starlette_response(response)
        # The common case, without Bolt's middleware and a thread hop: store, then answer.
        stored = {k: v for k, v in payload.items() if k != "token"}  # legacy verification token
        await asyncio.wrap_future(ctx.recorder.submit(
            source="slack", delivery_id=events.delivery_id(kind, stored), event=kind,
            payload=stored))
        return Response(status_code=200)

    return [Route(EVENTS_PATH, slack_events, methods=["POST"])]


def run_socket_mode(
    settings: Settings,
    store: Store,
    enqueue_delivery: Callable[[int], object],
    client: WebClient | None = None,
    *,
    block: bool = True,
):
    """Receive events over Socket Mode (no public URL needed). `serve --socket-mode` calls this.

    With block=False it connects and returns the handler (call `.close()` to stop).
    """
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    token = settings.slack.app_token
    if token is None:
        raise SlackNotConfigured(
            "CODELOOP_SLACK__APP_TOKEN is not set (an app-level token, xapp-…, with "
            "connections:write)"
        )
    app = build_app(settings, store, enqueue_delivery, client=client, socket_mode=True)
    handler = SocketModeHandler(app, token.get_secret_value())
    if block:
        handler.start()
    else:
        handler.connect()
    return handler
