"""Sign a request body the way Slack does (v0 HMAC-SHA256 over `v0:timestamp:body`).

Used by the tests and by bench/ingress.py to drive the real Bolt app over HTTP.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlencode

from slack_sdk.signature import SignatureVerifier


def signed_headers(signing_secret: str, body: str, timestamp: int | None = None,
                   content_type: str = "application/json") -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(signing_secret).generate_signature(timestamp=ts, body=body)
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
        "Content-Type": content_type,
    }


def event_body(event: dict, event_id: str, team: str = "T0CODELOOP",
               bot_user: str = "UCODELOOP") -> str:
    """An Events API callback as Slack posts it (with the `authorizations` naming the bot)."""
    return json.dumps({
        "token": "unused", "team_id": team, "api_app_id": "A0CODELOOP", "type": "event_callback",
        "event_id": event_id, "event_time": int(time.time()), "event": event,
        "authorizations": [{"enterprise_id": None, "team_id": team, "user_id": bot_user,
                            "is_bot": True, "is_enterprise_install": False}],
        "is_ext_shared_channel": False,
    })


def command_body(text: str, *, channel: str, user: str, trigger_id: str,
                 command: str = "/codeloop",
                 response_url: str = "https://hooks.slack.com/commands/T0CODELOOP/1/x") -> str:
    """A slash command as Slack posts it (form-encoded)."""
    return urlencode({
        "command": command, "text": text, "channel_id": channel, "user_id": user,
        "team_id": "T0CODELOOP", "trigger_id": trigger_id, "user_name": user.lower(),
        "response_url": response_url, "api_app_id": "A0CODELOOP",
    })


def action_body(action_id: str, value: str, *, channel: str, user: str, message_ts: str,
                trigger_id: str) -> str:
    """A block_actions click (form-encoded `payload=`)."""
    payload = {
        "type": "block_actions", "trigger_id": trigger_id, "api_app_id": "A0CODELOOP",
        "team": {"id": "T0CODELOOP"}, "user": {"id": user}, "channel": {"id": channel},
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel},
        "actions": [{"action_id": action_id, "value": value, "type": "button",
                     "block_id": "codeloop", "action_ts": f"{time.time():.6f}"}],
    }
    return urlencode({"payload": json.dumps(payload)})
