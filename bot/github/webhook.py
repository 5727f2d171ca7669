"""`POST /github/webhook`: verify, store once, enqueue, answer. Nothing slower runs here.

The signature (`X-Hub-Signature-256`, HMAC-SHA256 of the raw body with the webhook secret)
is checked in constant time before anything is parsed or stored. Without a configured
secret every delivery is refused: an unauthenticated endpoint would let anyone start jobs.

Both content types a repository webhook can be created with are accepted: `application/json`
and GitHub's default for repository webhooks, `application/x-www-form-urlencoded`, whose
body is `payload=<url-encoded JSON>` (the signature covers that raw body).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from bot import deliveries
from bot.github.events import EVENTS
from bot.web import TooLarge, read_body

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 25 * 1024 * 1024  # GitHub caps webhook payloads at 25 MB


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for `body`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(secret: str | None, body: bytes, signature: str | None) -> bool:
    if not secret or not signature:
        return False
    return hmac.compare_digest(sign(secret, body).encode(), signature.strip().encode())


def _json_text(content_type: str, body: bytes) -> bytes | str:
    """The JSON text of a delivery, for either content type GitHub sends."""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return body
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
    except UnicodeDecodeError as exc:
        raise ValueError("the form body is not UTF-8") from exc
    values = form.get("payload")
    if not values or len(values) != 1:
        raise ValueError("a form-encoded delivery has exactly one `payload` field")
    return values[0]


def routes(ctx) -> list[BaseRoute]:
    """The GitHub feature's routes (see bot.web.default_features)."""
    secret_value = ctx.settings.github.webhook_secret
    secret = secret_value.get_secret_value() if secret_value is not None else None

    async def webhook(request: Request) -> JSONResponse:
        try:
            body = await read_body(request, MAX_BODY_BYTES)
        except TooLarge:
            return JSONResponse({"error": "payload too large"}, status_code=413)
        if not verify(secret, body, request.headers.get("x-hub-signature-256")):
            return JSONResponse({"error": "bad or missing X-Hub-Signature-256"}, status_code=401)
        event = request.headers.get("x-github-event", "")
        delivery_id = request.headers.get("x-github-delivery", "")
        if not event or not delivery_id or len(delivery_id) > 200:
            return JSONResponse(
                {"error": "X-GitHub-Event and X-GitHub-Delivery are required"}, status_code=400
            )
        try:
            payload = json.loads(_json_text(request.headers.get("content-type", ""), body))
        except ValueError as exc:
            return JSONResponse({"error": f"the body is not a webhook payload: {exc}"},
                                status_code=400)
        except RecursionError:
            return JSONResponse({"error": "the body is nested too deeply"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"error": "the body is not a JSON object"}, status_code=400)
        if event == "ping":
            return JSONResponse({"ok": True, "zen": payload.get("zen")})
        if event not in EVENTS:
            return JSONResponse({"ignored": f"codeloop does not use {event} events"})
        action = payload.get("action")
        name = f"{event}.{action}" if isinstance(action, str) else event
        # Stored (committed with whatever else arrived at the same moment) before the answer;
        # the recorder enqueues it for the worker right after.
        recorded: deliveries.Recorded = await asyncio.wrap_future(ctx.recorder.submit(
            source="github", delivery_id=delivery_id, event=name[:100], payload=payload,
        ))
        if not recorded.enqueue:
            return JSONResponse({"delivery": recorded.id, "duplicate": True})
        if recorded.retry:  # "Redeliver" of a delivery that failed or was never handled
            return JSONResponse({"delivery": recorded.id, "retry": True}, status_code=202)
        return JSONResponse({"delivery": recorded.id}, status_code=202)

    return [Route("/github/webhook", webhook, methods=["POST"])]
