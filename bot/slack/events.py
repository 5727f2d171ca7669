"""Slack payloads → typed values, at the edge (docs/architecture.md).

`parse(kind, payload)` turns one stored delivery (an Events API callback, a slash command,
a button click) into one of the values below. Nothing Slack-shaped goes further than this
module. Malformed input raises `SlackPayloadError` with a message that says which field is
wrong; it never raises anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

# Delivery kinds, as stored in `deliveries.event`.
EVENT = "event_callback"
COMMAND = "slash_command"
ACTION = "block_actions"

COMMAND_NAME = "/codeloop"
RETRY_ACTION = "codeloop_retry"
CANCEL_ACTION = "codeloop_cancel"
# What the app subscribes to; the manifest test checks deploy/slack-app-manifest.yml against it.
SUBSCRIBED_EVENTS = ("message", "app_mention")
ACTIONS = (RETRY_ACTION, CANCEL_ACTION)

MAINTAINER_COMMANDS = ("link", "unlink", "status", "retrain", "schedule")
# Message subtypes that are still a person writing a message; every other one (edits,
# deletions, joins, bot messages, …) is ignored.
_PERSON_SUBTYPES = (None, "thread_broadcast", "file_share")
_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")
# Slack's markup in message text: <@U1>, <#C1|name>, <!here>, <!subteam^S1|@team>,
# <https://url|label>, <mailto:a@b|a@b>.
_MARKUP = re.compile(r"<([^<>]*)>")
_REPO = re.compile(r"(?:^|\s)repo=(\S+)")


class SlackPayloadError(ValueError):
    """The payload is not what Slack sends; the message names the field."""


@dataclass(frozen=True)
class Ask:
    """A requirement: a message in a channel, an @mention, or `/codeloop <requirement>`."""

    via: Literal["message", "mention", "command"]
    channel: str
    user: str
    text: str  # mentions and `repo=` removed
    repo: str | None  # from `repo=owner/name`, when given
    ts: str | None  # the message's ts (None for a slash command)
    thread_ts: str | None  # set when the message was written inside a thread
    key: str  # identity of the message: a message and its app_mention share it
    response_url: str | None = None  # slash commands: answers when the bot is not in the channel
    mentions_bot: bool = False  # the text @mentions the bot (its app_mention copy also comes)


@dataclass(frozen=True)
class ThreadReply:
    """A message inside a thread (it matters only when the thread is codeloop's)."""

    channel: str
    user: str
    text: str
    ts: str
    thread_ts: str
    mention: bool = False  # an app_mention event: a request, when the thread is not codeloop's
    mentions_bot: bool = False  # the text @mentions the bot (also true of the message copy)


@dataclass(frozen=True)
class Command:
    """`/codeloop link|unlink|status|retrain|schedule|help …`."""

    name: str  # link | unlink | status | retrain | schedule | help
    arg: str
    channel: str
    user: str
    response_url: str | None = None


@dataclass(frozen=True)
class Button:
    """A click on Retry or Cancel under a progress message."""

    name: Literal["retry", "cancel"]
    job_id: int
    channel: str
    user: str
    message_ts: str | None


@dataclass(frozen=True)
class Skip:
    """A payload that needs no action (a bot's message, an edit, …); `reason` says why."""

    reason: str


SlackInput = Ask | ThreadReply | Command | Button | Skip


# ---------------------------------------------------------------- helpers


def _obj(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SlackPayloadError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _str(data: dict, key: str, where: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise SlackPayloadError(f"{where}.{key} is missing")
        return None
    if not isinstance(value, str):
        raise SlackPayloadError(f"{where}.{key} must be a string, got {type(value).__name__}")
    if required and not value:
        raise SlackPayloadError(f"{where}.{key} is empty")
    return value


def split_repo(text: str) -> tuple[str, str | None]:
    """Remove a `repo=owner/name` token from the text; returns (text, repo or None)."""
    match = _REPO.search(text)
    if not match:
        return text.strip(), None
    repo = match.group(1).strip("<>")
    return (text[: match.start()] + " " + text[match.end():]).strip(), repo


def _readable(markup: str) -> str:
    """One piece of Slack markup (without its angle brackets) as a person reads it."""
    target, _, label = markup.partition("|")
    if target.startswith("@"):  # a person: keep who it is
        return label if label.startswith("@") else "@" + (label or target[1:])
    if target.startswith("#"):
        return "#" + (label or target[1:])
    if target.startswith("!"):  # <!here>, <!channel>, <!subteam^S1|@team>, <!date^…|text>
        if label:
            return label
        return "@" + target[1:].split("^", 1)[0]
    if label and label != target:  # a link shown under other words: keep both
        return f"{label} ({target})"
    return target.removeprefix("mailto:")


def clean_text(text: str, bot_user: str | None = None) -> str:
    """Text as a person reads it: the bot's own mention removed; other people's mentions,
    channels and links kept in readable form (`@U123`, `#general`, `label (https://…)`);
    Slack's escapes undone. Without `bot_user`, a mention that opens the text is the bot's."""
    if bot_user:
        text = re.sub(rf"<@{re.escape(bot_user)}(?:\|[^>]*)?>", " ", text)
    else:
        text = re.sub(r"^\s*<@[A-Z0-9]+(?:\|[^>]*)?>", " ", text)
    text = _MARKUP.sub(lambda m: _readable(m.group(1)), text)
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return "\n".join(" ".join(line.split()) for line in text.strip().splitlines()).strip()


def _bot_user(payload: dict) -> str | None:
    """The bot's user id, from the `authorizations` Slack puts in every Events API callback."""
    auths = payload.get("authorizations")
    if isinstance(auths, list):
        for auth in auths:
            if isinstance(auth, dict) and auth.get("is_bot") and isinstance(auth.get("user_id"),
                                                                            str):
                return auth["user_id"]
    return None


# ---------------------------------------------------------------- parsing


def parse(kind: str, payload: Any) -> SlackInput:
    """One stored Slack delivery → a typed value. Raises SlackPayloadError when malformed."""
    payload = _obj(payload, "payload")
    if kind == EVENT:
        return _parse_event(payload)
    if kind == COMMAND:
        return _parse_command(payload)
    if kind == ACTION:
        return _parse_action(payload)
    raise SlackPayloadError(f"unknown Slack delivery kind {kind!r}")


def _parse_event(payload: dict) -> SlackInput:
    event = _obj(payload.get("event"), "event")
    etype = _str(event, "type", "event")
    if etype not in SUBSCRIBED_EVENTS:
        return Skip(f"event {etype!r} is not one codeloop handles")
    subtype = _str(event, "subtype", "event", required=False)
    if event.get("bot_id") is not None or subtype == "bot_message":
        return Skip("a bot's message")
    if subtype not in _PERSON_SUBTYPES:
        return Skip(f"message subtype {subtype!r} (edits, deletions and joins are ignored)")
    channel = _str(event, "channel", "event")
    user = _str(event, "user", "event")
    ts = _str(event, "ts", "event")
    raw = _str(event, "text", "event", required=False) or ""
    thread_ts = _str(event, "thread_ts", "event", required=False) or None
    bot = _bot_user(payload)
    text = clean_text(raw, bot)
    mentioned = {m.group(1) for m in _MENTION.finditer(raw)}
    mentions_bot = etype == "app_mention" or (bot in mentioned if bot else False)
    if thread_ts and thread_ts != ts:
        return ThreadReply(channel=channel, user=user, text=text, ts=ts, thread_ts=thread_ts,
                           mention=etype == "app_mention", mentions_bot=mentions_bot)
    text, repo = split_repo(text)
    via = "mention" if etype == "app_mention" else "message"
    if via == "message" and event.get("channel_type") not in (None, "channel", "group"):
        return Skip(f"a message in a {event.get('channel_type')} (only channels are watched)")
    return Ask(via=via, channel=channel, user=user, text=text, repo=repo, ts=ts,
               thread_ts=None, key=f"{channel}:{ts}", mentions_bot=mentions_bot)


def _parse_command(payload: dict) -> SlackInput:
    name = _str(payload, "command", "command")
    if name != COMMAND_NAME:
        return Skip(f"command {name!r} is not codeloop's")
    channel = _str(payload, "channel_id", "command")
    user = _str(payload, "user_id", "command")
    trigger = _str(payload, "trigger_id", "command")
    text = clean_text(" " + (_str(payload, "text", "command", required=False) or ""), "-")
    response_url = _str(payload, "response_url", "command", required=False) or None
    word, _, rest = text.partition(" ")
    word = word.lower()
    if not text or word == "help":
        return Command(name="help", arg="", channel=channel, user=user, response_url=response_url)
    if word in MAINTAINER_COMMANDS:
        return Command(name=word, arg=rest.strip(), channel=channel, user=user,
                       response_url=response_url)
    text, repo = split_repo(text)
    return Ask(via="command", channel=channel, user=user, text=text, repo=repo, ts=None,
               thread_ts=None, key=f"command:{trigger}", response_url=response_url)


def _parse_action(payload: dict) -> SlackInput:
    actions = payload.get("actions")
    if not isinstance(actions, list) or not actions:
        raise SlackPayloadError("actions must be a non-empty list")
    action = _obj(actions[0], "actions[0]")
    action_id = _str(action, "action_id", "actions[0]")
    if action_id not in ACTIONS:
        return Skip(f"action {action_id!r} is not codeloop's")
    value = _str(action, "value", "actions[0]")
    if not value.isdigit() or len(value) > 18:
        raise SlackPayloadError(f"actions[0].value must be a job number, got {value[:40]!r}")
    user = _str(_obj(payload.get("user"), "user"), "id", "user")
    channel = _str(_obj(payload.get("channel"), "channel"), "id", "channel")
    container = payload.get("container")
    message_ts = None
    if isinstance(container, dict):
        message_ts = _str(container, "message_ts", "container", required=False)
    return Button(name="retry" if action_id == RETRY_ACTION else "cancel", job_id=int(value),
                  channel=channel, user=user, message_ts=message_ts)


def delivery_id(kind: str, payload: dict) -> str:
    """The id a delivery is stored under: Slack's event_id (its retries carry the same one),
    or the trigger id of a command or click (Slack never redelivers those)."""
    if kind == EVENT and isinstance(payload.get("event_id"), str):
        return payload["event_id"]
    trigger = payload.get("trigger_id")
    if isinstance(trigger, str) and trigger:
        return f"{kind}:{trigger}"
    container = payload.get("container") if isinstance(payload.get("container"), dict) else {}
    actions = payload.get("actions") if isinstance(payload.get("actions"), list) else []
    action_ts = actions[0].get("action_ts") if actions and isinstance(actions[0], dict) else None
    return f"{kind}:{container.get('message_ts')}:{action_ts}"
