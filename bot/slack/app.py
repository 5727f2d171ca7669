"""The slack-bolt app: verify, store, enqueue, acknowledge. Nothing else runs here.

Served over HTTP at `POST /slack/events` on codeloop's web server (`routes`), or over
Socket Mode (`run_socket_mode`) for workspaces without a public URL. Every listener
records the payload as a delivery (one INSERT; Slack's retries carry the same event_id and
hit the unique constraint) and enqueues its id for the worker (bot.slack.handler).
Bolt checks the signing secret and the timestamp: forged or stale requests get 401 and
nothing is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

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
) -> App:
    """A Bolt app whose listeners store the delivery and enqueue it, then acknowledge."""
    secret = settings.slack.signing_secret
    if secret is None and not socket_mode:
        raise SlackNotConfigured(
            "CODELOOP_SLACK__SIGNING_SECRET is not set (Basic Information → Signing Secret)"
        )
    client = client or web_client(settings)
    auth: dict = {}  # Bolt takes the token from the client and checks it with auth.test once
    if bot_identity is not None:
        def authorize(team_id=None):
            return AuthorizeResult(enterprise_id=None, team_id=bot_identity.team_id or team_id,
                                   bot_token=client.token, bot_id=bot_identity.bot_id,
                                   bot_user_id=bot_identity.user_id)

        auth = {"authorize": authorize}
    app = App(
        signing_secret=secret.get_secret_value() if secret else "socket-mode",
        client=client,
        # The listener's insert finishes before the answer: an acknowledged event is stored.
        process_before_response=True,
        request_verification_enabled=not socket_mode,
        logger=logging.getLogger("bot.slack.bolt"),
        **auth,
    )

    def recorder(kind: str) -> Callable:
        def listener(ack, body: dict) -> None:
            payload = {k: v for k, v in body.items() if k != "token"}  # legacy verification token
            rec = deliveries.record(
                store, source="slack", delivery_id=events.delivery_id(kind, payload),
                event=kind, payload=payload,
            )
            if rec.created:
                enqueue_delivery(rec.id)
            ack()

        return listener

    for name in events.SUBSCRIBED_EVENTS:
        app.event(name)(recorder(events.EVENT))
    app.command(events.COMMAND_NAME)(recorder(events.COMMAND))
    for action_id in events.ACTIONS:
        app.action(action_id)(recorder(events.ACTION))
    return app


def routes(ctx) -> list:
    """`POST /slack/events` for bot.web (design rule 2). Empty when Slack is not configured."""
    from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.routing import Route

    settings: Settings = ctx.settings
    if settings.slack.signing_secret is None or settings.slack.bot_token is None:
        return []
    app = build_app(settings, ctx.store, ctx.enqueue_delivery,
                    client=ctx.extras.get("slack_client"),
                    bot_identity=ctx.extras.get("slack_bot_identity"))

    async def slack_events(request: Request):
        body = await request.body()
        # Bolt is synchronous (one INSERT): run it off the event loop.
        response = await run_in_threadpool(app.dispatch, to_bolt_request(request, body))
        return to_starlette_response(response)

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
