"""Slack as it really behaves (issue 15, items 9-15 and 17): interactive requests on their own
path, who may revise, mentions inside threads, escaping, junk at the door, the requester told
at the end, and a web server that starts while Slack's Web API is down.

Real parts on loopback: signed requests to codeloop's web server (uvicorn, the Bolt app), the
real huey queues with the default worker count (one job at a time, plus the deliveries
consumer every worker runs), the local forge, and the local Slack Web API server. Bodies are
slack-bolt's own test bodies (tests/fixtures/slack) with our channel, user and text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from sqlalchemy import select
from starlette.testclient import TestClient

from tests import slack_signing as signing
from bot.slack.events import CANCEL_ACTION
from bot.slack.messages import JobView, failed
from bot.store.models import Delivery, Request, ReviewSignal
from tests.fakes import GOOD, ScriptedBackend
from tests.slack_harness import ADMIN, ALICE, SECRET
from tests.slack_server import BOT_USER
from tests.test_slack_edge import LINKED, REVISED, UNLINKED, GatedBackend

pytest_plugins = ["tests.slack_fixtures"]  # harness_factory, repo, slack_api

FIXTURES = Path(__file__).parent / "fixtures" / "slack"
BOB = "UBOB"


def bolt_mention(text: str, *, channel: str, user: str, ts: str, thread_ts: str | None = None,
                 kind: str = "app_mention") -> dict:
    """slack-bolt's `app_mention_event_body`, as ours: channel, user, text, ts, thread."""
    body = json.loads((FIXTURES / "app_mention.json").read_text())
    event = {**body["event"], "type": kind, "text": text, "user": user, "channel": channel,
             "ts": ts, "event_ts": ts, "team": "T0CODELOOP"}
    if thread_ts:
        event["thread_ts"] = thread_ts
    if kind == "message":
        event["channel_type"] = "channel"
    return event


def bolt_click(action_id: str, value: str, *, channel: str, user: str, message_ts: str) -> str:
    """slack-bolt's block_actions `body`, as ours, form-encoded as Slack posts it."""
    body = json.loads((FIXTURES / "block_actions.json").read_text())
    body["user"]["id"] = user
    body["channel"]["id"] = body["container"]["channel_id"] = channel
    body["container"]["message_ts"] = message_ts
    body["actions"][0].update(action_id=action_id, value=value, action_ts=f"{time.time():.6f}")
    body["trigger_id"] = f"111.{time.monotonic_ns()}.valid"
    return urlencode({"payload": json.dumps(body)})


def bolt_command(text: str, *, channel: str, user: str, response_url: str) -> str:
    """slack-bolt's `slash_command_body`, as ours."""
    fields = {k: v[0] for k, v in parse_qs((FIXTURES / "slash_command.txt").read_text().strip(),
                                           keep_blank_values=True).items()}
    fields.update(command="/codeloop", text=text, channel_id=channel, user_id=user,
                  response_url=response_url, trigger_id=f"111.{time.monotonic_ns()}.xxx")
    return urlencode(fields)


def ephemerals(h, user: str | None = None) -> list[dict]:
    return [c.params for c in h.slack.of("chat.postEphemeral")
            if user is None or c.params.get("user") == user]


# ---------------------------------------------------------------- item 9


def test_clicks_commands_and_answers_do_not_wait_behind_a_running_job(harness_factory):
    backend = GatedBackend(GOOD, GOOD)
    h = harness_factory(backend)
    assert h.settings.queue.workers == 1  # the default: one job at a time
    _, ts = h.message("Add a whisper(text) helper", channel=LINKED, user=ALICE)
    assert backend.entered.wait(60), "the job never reached the model"
    job_id = h.requests()[0].jobs[0].id
    # While job 1 is generating (and holds the only job worker) …
    h.message("Add a yell(text) helper", channel=LINKED, user=BOB)
    h.slack.wait_for(lambda s: any(t.startswith("Queued as #2") for t in s.texts()),
                     timeout=15, what="Queued as #2")
    hooks = h.slack.hooks_url
    h.post(bolt_command("status", channel=LINKED, user=ADMIN, response_url=hooks + "r1"),
           "application/x-www-form-urlencoded")
    h.post(bolt_command("help", channel=LINKED, user=BOB, response_url=hooks + "r2"),
           "application/x-www-form-urlencoded")
    h.post(bolt_command("retrain now", channel=LINKED, user=BOB, response_url=hooks + "r3"),
           "application/x-www-form-urlencoded")
    h.slack.wait_for(lambda s: len(ephemerals(h)) >= 3, timeout=15, what="three answers")
    said = " ".join(p["text"] for p in ephemerals(h))
    assert "1 running" in said and "turns requirements into pull requests" in said
    assert "for codeloop admins" in said
    # … and Cancel is handled while the job still runs, not after it.
    h.post(bolt_click(CANCEL_ACTION, str(job_id), channel=LINKED, user=ALICE,
                      message_ts="1.0"), "application/x-www-form-urlencoded")
    h.slack.wait_for(lambda s: any("cancelled #1 (job" in t for t in s.texts()), timeout=15,
                     what="cancel reply")
    assert h.job(job_id).state == "cancelled"
    assert not backend.release.is_set()  # all of the above happened mid-generation
    backend.release.set()
    h.wait_job(job_id)
    assert h.job(job_id).state == "cancelled"


# ---------------------------------------------------------------- items 10, 11, 15


def test_only_the_requester_a_mention_or_a_reviser_revises(harness_factory, repo):
    h = harness_factory(ScriptedBackend(GOOD, REVISED, REVISED), revisers=["UCAROL"])
    _, ts = h.message("Add a whisper(text) helper <https://docs.example/whisper|the spec> "
                      f"as <@{BOB}> asked", channel=LINKED, user=ALICE)
    h.wait_deliveries_handled()
    first = h.wait_job(h.requests()[0].jobs[0].id)
    assert first.state == "succeeded"
    # The requester is told at the end, in a new message that mentions them.
    h.slack.wait_for(lambda s: any(t.startswith(f"<@{ALICE}> #1 is done") for t in s.texts()),
                     what="the requester's notice")
    # Links and other people's mentions reach the model readable, the bot's own is gone.
    requirement = h.requests()[0].requirement
    assert "the spec (https://docs.example/whisper)" in requirement
    assert f"@{BOB} asked" in requirement
    # Chatter in the thread by others: no revision, no feedback stored.
    h.message("nice, thanks!", channel=LINKED, user=BOB, thread_ts=ts)
    h.message("lunch at 12?", channel=LINKED, user="UDAVE", thread_ts=ts)
    h.wait_deliveries_handled()
    assert len(h.requests()[0].jobs) == 1
    with h.store.session() as s:
        assert s.scalars(select(ReviewSignal)).all() == []
        notes = s.scalars(select(Delivery.note).order_by(Delivery.id)).all()
    assert sum("someone other than the requester" in (n or "") for n in notes) == 2
    # A configured reviser's reply revises; so does anyone's mention of the bot.
    h.message("Use a real ellipsis character", channel=LINKED, user="UCAROL", thread_ts=ts)
    h.slack.wait_for(lambda s: any(t.startswith("Revising pull request #1") for t in s.texts()),
                     what="the reviser's revision")
    h.wait_job(max(j.id for j in h.requests()[0].jobs))
    mention_ts = "1800000001.000001"
    h.event(bolt_mention(f"<@{BOT_USER}> and add a docstring", channel=LINKED, user=BOB,
                         ts=mention_ts, thread_ts=ts))
    h.event(bolt_mention(f"<@{BOT_USER}> and add a docstring", channel=LINKED, user=BOB,
                         ts=mention_ts, thread_ts=ts, kind="message"))  # its message copy
    h.wait_deliveries_handled()
    jobs = h.requests()[0].jobs
    assert len(jobs) == 3  # create, the reviser's revision, the mention's revision: one each
    h.wait_job(max(j.id for j in jobs))


def test_a_mention_inside_someone_elses_thread_is_one_request(harness_factory):
    h = harness_factory()
    root = "1800000002.000001"
    for order in (("app_mention", "message"), ("message", "app_mention")):
        ts = f"18000000{len(h.requests()) + 3}.000001"
        for kind in order:
            h.event(bolt_mention(f"<@{BOT_USER}> add a whisper(text) helper", channel=LINKED,
                                 user=ALICE, ts=ts, thread_ts=root, kind=kind))
            h.wait_deliveries_handled()
        root = f"1800000009.00000{len(h.requests())}"
    assert len(h.requests()) == 2 and all(len(r.jobs) == 1 for r in h.requests())
    texts = h.slack.texts()
    assert not [t for t in texts if "not open yet" in t or t.startswith("Revising")]
    for r in h.requests():
        h.wait_job(r.jobs[0].id)


# ---------------------------------------------------------------- item 12


def test_a_plain_message_with_repo_opens_nothing_outside_its_linked_channel(harness_factory,
                                                                           repo):
    h = harness_factory()
    h.message(f"add a helper repo={repo}", channel=UNLINKED, user=ALICE)
    h.message("add a helper repo=acme/elsewhere", channel=LINKED, user=ALICE)
    h.wait_deliveries_handled()
    assert h.requests() == []
    said = h.slack.texts()
    assert len(said) == 1 and "mention me" in said[0]  # the linked channel's user is told


# ---------------------------------------------------------------- item 13


def test_what_people_wrote_is_echoed_escaped(harness_factory):
    h = harness_factory()
    text = "add a helper <!channel> see <https://evil.example|github.com/acme/api> & more"
    h.post(bolt_command(text, channel=LINKED, user=ALICE,
                        response_url=h.slack.hooks_url + "r1"),
           "application/x-www-form-urlencoded")
    h.slack.wait_for(lambda s: any("asked for:" in t for t in s.texts()), what="the anchor")
    h.wait_deliveries_handled()
    anchor = next(t for t in h.slack.texts() if "asked for:" in t)
    assert anchor.startswith(f"<@{ALICE}> asked for: ")  # our own mention stays a mention
    echoed = anchor.split("asked for: ", 1)[1]
    assert "<" not in echoed and ">" not in echoed  # no ping, no disguised link
    assert "github.com/acme/api (https://evil.example)" in echoed and "&amp; more" in echoed
    h.wait_job(h.requests()[0].jobs[0].id)
    # A failure reason is model or tool output: escaped too.
    view = JobView(job_id=1, request_id=1, repo="acme/<!here>", kind="create", state="failed",
                   started=h.job(1).created_at, now=h.job(1).created_at,
                   error="tests failed: <!channel> <https://x.example|ok> a&b")
    shown = failed(view)
    assert "<!" not in json.dumps(shown.blocks) and "<https://x" not in shown.text
    assert "&lt;!channel&gt;" in shown.text and "a&amp;b" in shown.text


# ---------------------------------------------------------------- item 14


def test_junk_gets_4xx_before_anything_is_parsed_or_stored(harness_factory):
    h = harness_factory()

    def signed(body: str, content_type: str = "application/json", **headers):
        sent = {**signing.signed_headers(SECRET, body, None, content_type), **headers}
        return h.http.post("/slack/events", content=body, headers=sent)

    assert signed("{not json").status_code == 400
    assert signed("[" * 100_000 + "]" * 100_000).status_code == 400  # nested too deep
    assert signed('"a string"').status_code == 400
    assert signed("{}", **{"X-Slack-Request-Timestamp": "soon"}).status_code == 401
    unsigned = h.http.post("/slack/events", content=b"x" * (2 * 1024 * 1024),
                           headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 413
    chunked = h.http.post("/slack/events", content=iter([b"x" * 65536] * 40),  # no length
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413  # cut off while reading, before any check or parse
    # Slack's own notices and other apps' buttons are acknowledged, not 404.
    limited = signed(json.dumps({"token": "x", "type": "app_rate_limited", "team_id": "T0",
                                 "minute_rate_limited": 1518467820, "api_app_id": "A0"}))
    assert limited.status_code == 200
    other = h.post(bolt_click("someone_elses_button", "x", channel=LINKED, user=ALICE,
                              message_ts="1.0"), "application/x-www-form-urlencoded")
    assert other.status_code == 200
    assert h.count(Delivery) == 0 and h.count(Request) == 0


# ---------------------------------------------------------------- item 15: buttons


def test_button_answers_land_in_the_thread(harness_factory):
    h = harness_factory()
    _, ts = h.message("Add a whisper(text) helper", channel=LINKED, user=ALICE)
    h.wait_deliveries_handled()
    job_id = h.wait_job(h.requests()[0].jobs[0].id).id
    h.post(bolt_click(CANCEL_ACTION, str(job_id), channel=LINKED, user=ALICE, message_ts=ts),
           "application/x-www-form-urlencoded")
    h.slack.wait_for(lambda s: ephemerals(h), what="the answer")
    (answer,) = ephemerals(h)
    assert answer["thread_ts"] == ts
    assert answer["text"] == f"#1 (job {job_id}) has finished; nothing to cancel."


# ---------------------------------------------------------------- item 17


def test_the_web_server_starts_degraded_while_slack_is_down(tmp_path, slack_api):
    from pydantic import SecretStr

    from bot.github.webhook import sign
    from bot.settings import GitHubSettings
    from bot.store.db import Store
    from bot.web import WebContext, create_app, default_features
    from tests.support import make_settings
    from tests.slack_harness import slack_settings

    slack_api.down = True
    settings = make_settings(
        tmp_path / "home",
        slack=slack_settings(slack_api.api_url, auth_retry_seconds=0.2),
        github=GitHubSettings(webhook_secret=SecretStr("s3cret")),
    )
    store = Store(settings.database_url)
    ctx = WebContext(settings=settings, store=store, enqueue_delivery=lambda pk: None)
    app = create_app(ctx, default_features(settings))  # no exception: nothing asked Slack yet
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while ("failed" not in client.get("/readyz").json().get("degraded", {}).get("slack", "")
               and time.monotonic() < deadline):  # "not answered yet" first, then why
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and "auth.test failed" in ready.json()["degraded"]["slack"]
        body = b'{"zen": "Keep it logically awesome.", "hook_id": 1}'
        ping = client.post("/github/webhook", content=body, headers={
            "X-GitHub-Event": "ping", "X-GitHub-Delivery": "p1",
            "X-Hub-Signature-256": sign("s3cret", body), "Content-Type": "application/json"})
        assert ping.status_code == 200  # GitHub's route is up
        event = signing.event_body({"type": "message", "channel": LINKED, "user": ALICE,
                                    "text": "hi", "ts": "1.1", "channel_type": "channel"}, "EvX")
        stored = client.post("/slack/events", content=event,
                             headers=signing.signed_headers(SECRET, event))
        assert stored.status_code == 200 and store_count(store) == 1  # kept for the worker
        slack_api.down = False  # Slack is back: the retry clears the degraded state
        deadline = time.monotonic() + 10
        while "degraded" in client.get("/readyz").json() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/readyz").json() == {"ready": True, "detail": "ok"}
    ctx.extras["slack_identity"].stop()
    store.close()


def store_count(store) -> int:
    with store.session() as s:
        return len(s.scalars(select(Delivery.id)).all())



def test_codeloop_web_as_a_process_starts_while_slack_is_unreachable(tmp_path):
    """The real `codeloop web`, with Slack's Web API on a port where nothing listens."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from bot.github.webhook import sign
    from tests.support import cli_env, make_settings
    from tests.test_serve import free_port, wait_for

    port, dead = free_port(), free_port()
    env = cli_env(make_settings(tmp_path / "home"))
    env.update(CODELOOP_WEB__PORT=str(port), CODELOOP_SLACK__BOT_TOKEN="xoxb-x",
               CODELOOP_SLACK__SIGNING_SECRET=SECRET,
               CODELOOP_SLACK__API_URL=f"http://127.0.0.1:{dead}/api/",
               CODELOOP_SLACK__AUTH_RETRY_SECONDS="1", CODELOOP_GITHUB__WEBHOOK_SECRET="s3cret")
    log_path = tmp_path / "web.log"
    with open(log_path, "w") as log:
        web = subprocess.Popen([sys.executable, "-m", "bot.cli", "web"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            def degraded():
                try:
                    found = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json()
                except httpx.HTTPError:
                    return None
                # "not answered yet" while the client retries, then why it failed
                return "failed" in found.get("degraded", {}).get("slack", "") and found

            found = wait_for(degraded, 60, "a degraded /readyz")
            assert found["ready"] is True, log_path.read_text()
            assert "auth.test failed" in found["degraded"]["slack"]
            body = b'{"zen": "Design for failure.", "hook_id": 2}'
            ping = httpx.post(f"http://127.0.0.1:{port}/github/webhook", content=body, headers={
                "X-GitHub-Event": "ping", "X-GitHub-Delivery": "p2",
                "X-Hub-Signature-256": sign("s3cret", body), "Content-Type": "application/json"})
            assert ping.status_code == 200
            assert web.poll() is None  # still up
        finally:
            web.send_signal(signal.SIGTERM)
            try:
                web.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(web.pid, signal.SIGKILL)
    assert "Traceback" not in log_path.read_text()
