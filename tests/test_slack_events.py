"""Slack payloads parsed at the edge, and the app manifest checked against what the code uses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.slack import events
from bot.slack.app import EVENTS_PATH
from bot.slack.events import Ask, Button, Command, Skip, SlackPayloadError, ThreadReply
from tests import slack_signing as signing

ROOT = Path(__file__).resolve().parent.parent
HOOK = "https://hooks.slack.com/commands/T0CODELOOP/1/x"


def _event(**fields) -> dict:
    return json.loads(signing.event_body({"type": "message", "channel": "C1", "user": "U1",
                                          "ts": "1.5", "text": "hi", **fields}, "Ev1"))


def _command(text: str) -> dict:
    return {k: v[0] for k, v in parse_qs(signing.command_body(
        text, channel="C1", user="U1", trigger_id="t.1"), keep_blank_values=True).items()}


def test_messages_mentions_and_thread_replies():
    ask = events.parse(events.EVENT, _event(text="add a --verbose flag"))
    assert ask == Ask(via="message", channel="C1", user="U1", text="add a --verbose flag",
                      repo=None, ts="1.5", thread_ts=None, key="C1:1.5")
    mention = events.parse(events.EVENT, _event(
        type="app_mention", text="<@UCODELOOP> add x &amp; y repo=acme/api"))
    assert (mention.via, mention.text, mention.repo, mention.key) == (
        "mention", "add x & y", "acme/api", "C1:1.5")
    reply = events.parse(events.EVENT, _event(thread_ts="1.0", text="use a real ellipsis"))
    assert reply == ThreadReply(channel="C1", user="U1", text="use a real ellipsis", ts="1.5",
                                thread_ts="1.0")


def test_bots_edits_and_direct_messages_are_skipped():
    assert isinstance(events.parse(events.EVENT, _event(bot_id="B1")), Skip)
    assert "message_changed" in events.parse(events.EVENT, _event(subtype="message_changed")).reason
    assert isinstance(events.parse(events.EVENT, _event(channel_type="im")), Skip)


def test_slash_commands():
    assert events.parse(events.COMMAND, _command("add a --verbose flag repo=acme/api")) == Ask(
        via="command", channel="C1", user="U1", text="add a --verbose flag", repo="acme/api",
        ts=None, thread_ts=None, key="command:t.1", response_url=HOOK)
    assert events.parse(events.COMMAND, _command("link acme/api")) == Command(
        name="link", arg="acme/api", channel="C1", user="U1", response_url=HOOK)
    assert events.parse(events.COMMAND, _command("Schedule 0 3 * * 1")).name == "schedule"
    assert events.parse(events.COMMAND, _command("")).name == "help"


def test_buttons():
    body = json.loads(parse_qs(signing.action_body(
        events.CANCEL_ACTION, "42", channel="C1", user="U1", message_ts="9.9",
        trigger_id="t"))["payload"][0])
    assert events.parse(events.ACTION, body) == Button(name="cancel", job_id=42, channel="C1",
                                                       user="U1", message_ts="9.9")
    body["actions"][0]["value"] = "42; DROP TABLE jobs"
    try:
        events.parse(events.ACTION, body)
    except SlackPayloadError as exc:
        assert "job number" in str(exc)
    else:
        raise AssertionError("a non-numeric job id was accepted")


def test_malformed_payloads_name_the_field():
    for payload, field in [({}, "event"), ({"event": {"type": "message"}}, "event.channel"),
                           ({"event": {"type": "message", "channel": 5}}, "event.channel")]:
        try:
            events.parse(events.EVENT, payload)
        except SlackPayloadError as exc:
            assert field in str(exc)
        else:
            raise AssertionError(f"{payload} was accepted")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
event_like = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "app_mention", "reaction_added"]) | st.text(max_size=5),
    "subtype": st.none() | st.sampled_from(["message_changed", "thread_broadcast"]),
    "channel": st.text(max_size=5) | st.integers(), "user": st.text(max_size=5) | st.none(),
    "ts": st.text(max_size=6), "thread_ts": st.text(max_size=6) | st.none(),
    "text": st.text(max_size=40) | st.integers(), "bot_id": st.none() | st.text(max_size=3),
    "channel_type": st.sampled_from(["channel", "im", "group"]),
})


@settings(max_examples=1000, deadline=None)
@given(kind=st.sampled_from([events.EVENT, events.COMMAND, events.ACTION, "other"]),
       payload=json_values | st.dictionaries(st.sampled_from(
           ["event", "command", "text", "channel_id", "user_id", "trigger_id", "actions",
            "user", "channel", "container"]), json_values | event_like, max_size=8)
       | st.builds(lambda e: {"event": e}, event_like))
def test_parsing_never_raises_anything_but_a_clear_error(kind, payload):
    try:
        parsed = events.parse(kind, payload)
    except SlackPayloadError as exc:
        assert str(exc)
    else:
        assert isinstance(parsed, Ask | ThreadReply | Command | Button | Skip)
    events.delivery_id(kind, payload if isinstance(payload, dict) else {})


# ---------------------------------------------------------------- the manifest

EVENT_SCOPES = {"app_mention": "app_mentions:read", "message.channels": "channels:history",
                "message.groups": "groups:history"}
METHOD_SCOPES = {"chat_postMessage": "chat:write", "chat_update": "chat:write",
                 "chat_postEphemeral": "chat:write", "auth_test": None}  # auth.test: no scope


def test_manifest_asks_for_exactly_what_the_code_uses():
    manifest = yaml.safe_load((ROOT / "deploy/slack-app-manifest.yml").read_text())
    bot_events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    expected_events = {"app_mention"} if "app_mention" in events.SUBSCRIBED_EVENTS else set()
    if "message" in events.SUBSCRIBED_EVENTS:  # channels and private channels (channel_type)
        expected_events |= {"message.channels", "message.groups"}
    assert bot_events == expected_events

    source = "\n".join(p.read_text() for p in (ROOT / "bot/slack").glob("*.py"))
    methods = set(re.findall(r"\.client\.(\w+)\(", source))
    assert methods and methods <= set(METHOD_SCOPES), methods
    needed = {EVENT_SCOPES[e] for e in bot_events} | {METHOD_SCOPES[m] for m in methods}
    needed.discard(None)
    needed.add("commands")  # /codeloop
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == needed

    commands = manifest["features"]["slash_commands"]
    assert [c["command"] for c in commands] == [events.COMMAND_NAME]
    assert manifest["settings"]["interactivity"]["is_enabled"] is True  # Retry / Cancel
    for url in (commands[0]["url"], manifest["settings"]["event_subscriptions"]["request_url"],
                manifest["settings"]["interactivity"]["request_url"]):
        assert url.endswith(EVENTS_PATH)


def test_the_web_route_needs_no_slack_api_when_the_bot_identity_is_given(tmp_path):
    """What bench/ingress.py builds: signed events stored with no Web API reachable. (In-process
    ASGI client here on purpose: the point is that nothing else is listening.)"""
    from starlette.testclient import TestClient

    from bot.settings import SlackSettings
    from bot.slack.app import BotIdentity, routes
    from bot.store.db import Store
    from bot.store.models import Delivery
    from bot.web import WebContext, create_app
    from tests.support import make_settings

    settings = make_settings(tmp_path / "home", slack=SlackSettings(
        bot_token="xoxb-x", signing_secret="s3cret", api_url="http://127.0.0.1:9/api/"))
    store = Store(settings.database_url)
    queued: list[int] = []
    ctx = WebContext(settings=settings, store=store, enqueue_delivery=queued.append,
                     extras={"slack_bot_identity": BotIdentity("UBOT", "BBOT", "T1")})
    client = TestClient(create_app(ctx, [routes]))
    body = signing.event_body({"type": "message", "channel": "C1", "user": "U1", "ts": "1.1",
                               "text": "hi"}, "EvB1")
    ok = client.post(EVENTS_PATH, content=body,
                     headers=signing.signed_headers("s3cret", body))
    bad = client.post(EVENTS_PATH, content=body, headers=signing.signed_headers("nope", body))
    assert (ok.status_code, bad.status_code) == (200, 401)
    with store.session() as s:
        assert s.query(Delivery).count() == 1
    ctx.recorder.drain()  # the enqueue follows the answer
    assert len(queued) == 1
    store.close()


def test_the_web_server_serves_slack_only_when_it_is_configured(tmp_path):
    from bot.settings import SlackSettings
    from bot.slack.app import routes
    from bot.web import default_features
    from tests.support import make_settings

    assert routes not in default_features(make_settings(tmp_path / "a"))
    configured = make_settings(tmp_path / "b", slack=SlackSettings(bot_token="xoxb-x",
                                                                   signing_secret="s"))
    assert routes in default_features(configured)
