"""The web server's composition root: each feature module contributes routes; this wires them.

A feature module exposes `routes(ctx: WebContext) -> list[starlette.routing.BaseRoute]`
(docs/architecture.md). Handlers only verify, store and enqueue (docs/architecture.md): they get the
store and an `enqueue_delivery` callable, never a backend or a forge client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from bot.settings import Settings
from bot.store.db import Store

log = logging.getLogger(__name__)


@dataclass
class WebContext:
    settings: Settings
    store: Store
    enqueue_delivery: Callable[[int], object]  # puts a stored delivery's id on the queue
    extras: dict = field(default_factory=dict)  # feature-specific collaborators
    # Stores deliveries arriving together in one commit, then enqueues them (set by create_app).
    recorder: object = None


Feature = Callable[[WebContext], list[BaseRoute]]


class TooLarge(ValueError):
    """The request body is over the route's limit."""


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, read no further than `limit` bytes (a declared Content-Length over it is
    refused before reading; a chunked body is cut off as soon as it passes it)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise TooLarge(f"the body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _health(_request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def create_app(ctx: WebContext, features: Iterable[Feature]) -> Starlette:
    from bot.deliveries import Recorder

    if ctx.recorder is None:
        ctx.recorder = Recorder(ctx.store, ctx.enqueue_delivery)
    routes: list[BaseRoute] = [Route("/healthz", _health)]
    for feature in features:
        routes.extend(feature(ctx))
    # A feature may add ASGI middleware (bot.metrics times webhook acknowledgements).
    app = Starlette(routes=routes, middleware=list(ctx.extras.get("middleware", [])))
    app.state.ctx = ctx
    return app


def default_features(settings: Settings) -> list[Feature]:
    """The features this process serves, from settings. New features register here."""
    from bot import dashboard, metrics

    features: list[Feature] = [metrics.routes]
    if settings.slack.signing_secret is not None and settings.slack.bot_token is not None:
        from bot.slack.app import routes as slack_routes

        features.append(slack_routes)
    if settings.github.webhook_secret is not None:
        from bot.github import webhook

        features.append(webhook.routes)
    if settings.web.dashboard_token is not None:  # no token: no dashboard
        features.append(dashboard.routes)
    return features
