"""The webhook edge: signatures, dedupe, what is stored; payload parsing never crashes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import func, select
from starlette.testclient import TestClient

from bot.deliveries import Ignored
from bot.github import events
from bot.github.webhook import routes, sign, verify
from bot.settings import GitHubSettings
from bot.store.db import Store
from bot.store.models import Delivery
from bot.web import WebContext, create_app, default_features
from tests.support import make_settings

SECRET = "It's a Secret to Everybody"


def app_for(tmp_path, db_url=None, secret: str | None = SECRET):
    settings = make_settings(
        tmp_path / "home",
        db_url,
        github=GitHubSettings(webhook_secret=SecretStr(secret) if secret else None),
    )
    store = Store(settings.database_url)
    queued: list[int] = []
    ctx = WebContext(settings=settings, store=store, enqueue_delivery=queued.append)
    return TestClient(create_app(ctx, [routes])), store, queued


def labeled_body() -> bytes:
    return json.dumps(
        {
            "action": "labeled",
            "repository": {"full_name": "acme/widgets"},
            "installation": {"id": 1},
            "sender": {"login": "alice", "type": "User"},
            "issue": {"number": 3, "title": "t", "body": "b"},
            "label": {"name": "codeloop"},
        }
    ).encode()


def post(client, body: bytes, signature: str | None, delivery: str = "d-1", event="issues"):
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return client.post("/github/webhook", content=body, headers=headers)


def stored(store) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Delivery))


def test_signature_matches_githubs_documented_example():
    # docs.github.com "Validating webhook deliveries": this secret and payload give this value.
    assert sign(SECRET, b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )
    assert verify(SECRET, b"Hello, World!", sign(SECRET, b"Hello, World!"))
    assert not verify(SECRET, b"Hello, World?", sign(SECRET, b"Hello, World!"))
    assert not verify(None, b"x", sign("", b"x")) and not verify(SECRET, b"x", None)


def test_unsigned_or_wrongly_signed_deliveries_get_401_and_store_nothing(tmp_path, db_url):
    client, store, queued = app_for(tmp_path, db_url)
    body = labeled_body()
    assert post(client, body, None).status_code == 401
    assert post(client, body, sign("another secret", body)).status_code == 401
    assert post(client, body, sign(SECRET, body + b" ")).status_code == 401
    assert post(client, body, "sha1=" + sign(SECRET, body)[7:]).status_code == 401
    assert stored(store) == 0 and queued == []

    first = post(client, body, sign(SECRET, body))
    again = post(client, body, sign(SECRET, body))  # a redelivery: same X-GitHub-Delivery
    assert (first.status_code, again.status_code) == (202, 200)
    assert stored(store) == 1 and queued == [first.json()["delivery"]]
    with store.session() as s:
        row = s.scalar(select(Delivery))
        assert (row.source, row.delivery_id, row.event) == ("github", "d-1", "issues.labeled")
        assert row.payload["issue"]["number"] == 3


def test_without_a_configured_secret_every_delivery_is_refused(tmp_path):
    client, store, queued = app_for(tmp_path, secret=None)
    body = labeled_body()
    assert post(client, body, sign("", body)).status_code == 401
    assert stored(store) == 0
    # …and the feature is not served at all unless a secret is configured.
    assert routes not in default_features(make_settings(tmp_path / "h2"))
    assert routes in default_features(
        make_settings(tmp_path / "h3", github=GitHubSettings(webhook_secret=SecretStr(SECRET)))
    )


def test_ping_unused_events_and_bad_bodies(tmp_path):
    client, store, queued = app_for(tmp_path)
    ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
    answer = post(client, ping, sign(SECRET, ping), event="ping")
    assert answer.status_code == 200 and answer.json()["zen"] == "Keep it logically awesome."
    push = json.dumps({"ref": "refs/heads/main"}).encode()
    assert post(client, push, sign(SECRET, push), "d-2", event="push").status_code == 200
    not_json = b"{nope"
    assert post(client, not_json, sign(SECRET, not_json), "d-3").status_code == 400
    body = labeled_body()
    no_delivery = client.post(
        "/github/webhook",
        content=body,
        headers={"X-GitHub-Event": "issues", "X-Hub-Signature-256": sign(SECRET, body)},
    )
    assert no_delivery.status_code == 400
    assert stored(store) == 0 and queued == []


# ---------------------------------------------------------------- parsing


def test_payloads_parse_into_typed_events():
    trigger = events.parse("issues", json.loads(labeled_body()))
    assert trigger == events.Trigger(
        repo="acme/widgets",
        installation_id=1,
        number=3,
        title="t",
        body="b",
        sender="alice",
        sender_is_bot=False,
        on_pull_request=False,
        label="codeloop",
    )
    with pytest.raises(Ignored):
        events.parse("issues", {**json.loads(labeled_body()), "action": "opened"})
    with pytest.raises(events.MalformedPayload, match="issue.number"):
        events.parse("issues", {**json.loads(labeled_body()), "issue": {"number": "3"}})
    with pytest.raises(events.MalformedPayload, match="repository.full_name"):
        events.parse("issues", {"action": "labeled"})


def test_every_event_parse_returns_has_a_handler():
    """A parsed delivery never fails for want of a route (bot/github/handler.py ROUTES)."""
    from typing import get_args

    from bot.github.handler import ROUTES

    assert set(ROUTES) == set(get_args(events.Event))


def test_mentions_address_the_bot_only():
    assert events.mentions("@codeloop please", "codeloop")
    assert events.mentions("thanks @CodeLoop.", "codeloop")
    assert not events.mentions("@codeloop-ci rerun", "codeloop")
    assert not events.mentions("mail me@codeloop.dev", "codeloop")
    assert not events.mentions(None, "codeloop")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "action",
                    "repository",
                    "full_name",
                    "issue",
                    "number",
                    "title",
                    "body",
                    "label",
                    "name",
                    "comment",
                    "id",
                    "user",
                    "login",
                    "review",
                    "state",
                    "pull_request",
                    "merged",
                    "head",
                    "base",
                    "ref",
                    "sha",
                    "sender",
                    "installation",
                    "line",
                    "path",
                    "in_reply_to_id",
                    "merge_commit_sha",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=1000, deadline=None)
@given(event=st.sampled_from(sorted(events.EVENTS) + ["push"]), payload=json_values)
def test_parse_never_raises_anything_but_ignored_or_value_error(event, payload):
    try:
        events.parse(event, payload)
    except (Ignored, ValueError):
        pass


@settings(max_examples=200, deadline=None)
@given(
    action=st.sampled_from(["labeled", "created", "submitted", "closed"]),
    title=st.text(max_size=20),
    number=st.integers(min_value=1, max_value=10**9),
    merged=st.booleans(),
    state=st.sampled_from(["approved", "changes_requested", "commented", "dismissed"]),
)
def test_well_formed_payloads_parse_or_are_ignored(action, title, number, merged, state):
    user = {"login": "alice", "type": "User"}
    payload = {
        "action": action,
        "repository": {"full_name": "o/r"},
        "sender": user,
        "issue": {"number": number, "title": title, "body": None},
        "label": {"name": "codeloop"},
        "comment": {"id": 5, "body": "@codeloop x", "user": user, "path": "a.py", "line": 2},
        "review": {"id": 9, "state": state, "body": None, "user": user},
        "pull_request": {
            "number": number,
            "title": title,
            "body": None,
            "merged": merged,
            "user": user,
            "head": {"ref": "h"},
            "base": {"ref": "main", "sha": "1"},
        },
    }
    for event in sorted(events.EVENTS):
        try:
            parsed = events.parse(event, payload)
        except Ignored:
            continue
        assert parsed.repo == "o/r"


@settings(max_examples=200, deadline=None)
@given(
    secret=st.text(min_size=1, max_size=40),
    body=st.binary(max_size=200),
    flip=st.integers(min_value=0, max_value=199),
)
def test_only_the_exact_body_and_secret_verify(secret, body, flip):
    signature = sign(secret, body)
    assert verify(secret, body, signature)
    assert not verify(secret + "x", body, signature)
    if body:
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        assert not verify(secret, changed, signature)
