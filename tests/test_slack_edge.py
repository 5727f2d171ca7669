"""Slack at the edge and in the thread, over real HTTP: signed requests to codeloop's web
server (the real Bolt app), a real huey queue and worker, the local forge, and a local Slack
Web API server. The model is a scripted fake at the Backend port (the real model's run is in
test_slack_e2e_model.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select

from bot import deliveries
from bot.demo import make_sample_repo
from tests import slack_signing as signing
from bot.slack.events import CANCEL_ACTION, RETRY_ACTION
from bot.slack.handler import link_channel
from bot.store.models import (
    Delivery,
    PullRequest,
    Request,
    ReviewSignal,
    Revision,
    SlackThread,
)
from tests.support import git_out, make_settings
from tests.fakes import GOOD, ScriptedBackend
from tests.slack_harness import ADMIN, ALICE, Harness, final_texts, slack_settings
from tests.slack_server import SlackAPIServer

LINKED, UNLINKED = "CLINKED", "COTHER"

REVISED = GOOD.replace('return text.lower() + "..."', 'return text.lower() + "…"')


class GatedBackend(ScriptedBackend):
    """Blocks in generate until released, so a test can act while the job runs."""

    def __init__(self, *answers: str):
        super().__init__(*answers)
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, messages, params, on_text=None):
        self.entered.set()
        self.release.wait(60)
        return super().generate(messages, params, on_text)


@pytest.fixture
def slack_api():
    server = SlackAPIServer().start()
    yield server
    server.stop()


@pytest.fixture
def repo(tmp_path):
    return make_sample_repo(tmp_path / "repo")


@pytest.fixture
def harness_factory(tmp_path, slack_api, repo):
    made: list[Harness] = []

    def make(backend=None, db_url=None, **slack_extra) -> Harness:
        settings = make_settings(tmp_path / "home", db_url,
                                 slack=slack_settings(slack_api.api_url, **slack_extra))
        h = Harness(settings, slack_api, backend or ScriptedBackend(GOOD)).start()
        link_channel(h.store, LINKED, str(repo), ADMIN)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


# ---------------------------------------------------------------- the door


def test_forged_and_stale_requests_get_401_and_nothing_is_stored(harness_factory):
    h = harness_factory()
    forged, _ = h.message("add a whisper helper", channel=LINKED, secret="not-the-secret")
    stale, _ = h.message("add a whisper helper", channel=LINKED,
                         timestamp=int(time.time()) - 10 * 60)
    unsigned = h.http.post("/slack/events", content=b'{"type":"event_callback"}',
                           headers={"Content-Type": "application/json"})
    assert (forged.status_code, stale.status_code, unsigned.status_code) == (401, 401, 401)
    time.sleep(0.3)
    assert h.count(Delivery) == 0 and h.count(Request) == 0
    assert h.slack.of("chat.postMessage") == []
    good, _ = h.message("add a whisper helper", channel=LINKED)
    assert good.status_code == 200 and h.count(Delivery) == 1


def test_the_same_event_delivered_three_times_makes_one_job(harness_factory, db_url):
    h = harness_factory(db_url=db_url)
    first, ts = h.message("Add a whisper(text) helper", channel=LINKED, event_id="EvSAME")
    again, _ = h.message("Add a whisper(text) helper", channel=LINKED, ts=ts, event_id="EvSAME",
                         retry=1)
    third, _ = h.message("Add a whisper(text) helper", channel=LINKED, ts=ts, event_id="EvSAME",
                         retry=2)
    # The same message also arrives as an app_mention (its own event id): still one request.
    mention, _ = h.message("<@UCODELOOP> Add a whisper(text) helper", channel=LINKED, ts=ts,
                           kind="app_mention")
    assert [r.status_code for r in (first, again, third, mention)] == [200] * 4
    assert h.count(Delivery) == 2
    h.wait_deliveries_handled()
    requests = h.requests()
    assert len(requests) == 1 and len(requests[0].jobs) == 1
    queued = [t for t in h.slack.texts() if t.startswith("Queued as")]
    assert queued == [f"Queued as #{requests[0].id} for {requests[0].repo}"]
    h.wait_job(requests[0].jobs[0].id)


def test_an_event_whose_first_enqueue_was_lost_is_still_handled_once(harness_factory):
    h = harness_factory(ScriptedBackend("no edit"))
    h.settings.pipeline.max_attempts = 1
    # The first delivery was stored, then the process died before enqueueing it.
    body = json.loads(signing.event_body(
        {"type": "message", "channel": LINKED, "user": ALICE, "text": "Add a whisper helper",
         "ts": "1800000000.000777", "channel_type": "channel"}, "EvLOST"))
    lost = deliveries.record(h.store, source="slack", delivery_id="EvLOST",
                             event="event_callback", payload=body)
    # Slack retries (we never answered): acknowledged, not stored again.
    retry = h.post(json.dumps(body), "application/json", retry=1)
    assert retry.status_code == 200 and h.count(Delivery) == 1
    # The recovery sweep finds the row nobody handled and enqueues it: one request.
    assert deliveries.pending(h.store, stale_seconds=-1) == [lost.id]
    h.huey.codeloop_handle_delivery(lost.id)
    h.slack.wait_for(lambda s: [t for t in s.texts() if t.startswith("Queued as #1")],
                     what="queued reply")
    h.post(json.dumps(body), "application/json", retry=2)
    h.wait_job(h.requests()[0].jobs[0].id)
    assert len(h.requests()) == 1
    assert len([t for t in h.slack.texts() if t.startswith("Queued")]) == 1


def test_unmapped_channel_gets_a_helpful_reply_and_no_job(harness_factory):
    h = harness_factory()
    h.message("just chatting here", channel=UNLINKED)  # plain talk in an unlinked channel
    _, ts = h.message("<@UCODELOOP> add a whisper helper", channel=UNLINKED, kind="app_mention")
    rows = h.wait_deliveries_handled()
    assert [r.state for r in rows] == ["ignored", "ignored"]
    replies = h.slack.of("chat.postMessage")
    assert len(replies) == 1, [c.params for c in replies]
    reply = replies[0].params
    assert reply["channel"] == UNLINKED and reply["thread_ts"] == ts
    assert "not linked to a repository" in reply["text"]
    assert "repo=owner/name" in reply["text"] and "/codeloop link" in reply["text"]
    assert h.count(Request) == 0


def test_bot_messages_edits_and_foreign_threads_are_ignored(harness_factory):
    h = harness_factory()
    h.event({"type": "message", "channel": LINKED, "bot_id": "B1", "text": "beep",
             "ts": "1.1", "user": "UBOT2"})
    h.event({"type": "message", "subtype": "message_changed", "channel": LINKED, "ts": "1.2",
             "message": {"text": "edited"}, "hidden": True})
    h.message("a reply in someone else's thread", channel=LINKED, thread_ts="1.0")
    rows = h.wait_deliveries_handled()
    assert [r.state for r in rows] == ["ignored"] * 3
    assert "bot" in rows[0].note and "message_changed" in rows[1].note
    assert "not codeloop's" in rows[2].note
    assert h.count(Request) == 0 and h.slack.of("chat.postMessage") == []
    # Mentioning the bot inside someone's thread is a request, answered in that thread.
    h.message("<@UCODELOOP> Add a whisper(text) helper", channel=LINKED, thread_ts="1.0",
              kind="app_mention")
    queued = h.slack.wait_for(lambda s: s.of("chat.postMessage"), what="queued reply")[0]
    assert queued.params["text"].startswith("Queued as #1") and queued.params["thread_ts"] == "1.0"
    h.wait_job(h.requests()[0].jobs[0].id)


# ---------------------------------------------------------------- maintainers


def test_maintainer_commands_refuse_non_admins_and_status_answers_admins(harness_factory, repo):
    h = harness_factory()
    assert h.command("retrain now", channel=LINKED, user=ALICE).status_code == 200
    assert h.command("link acme/api", channel=UNLINKED, user=ALICE).status_code == 200
    h.wait_deliveries_handled()
    refusals = h.slack.of("chat.postEphemeral")
    assert len(refusals) == 2
    assert all(c.params["user"] == ALICE and "for codeloop admins" in c.params["text"]
               for c in refusals)
    assert sorted("retrain" in c.params["text"] for c in refusals) == [False, True]
    assert not any(t.startswith("Linked") for t in h.slack.texts("chat.postEphemeral"))

    h.command("status", channel=LINKED, user=ADMIN)
    status = h.slack.wait_for(lambda s: [c for c in s.of("chat.postEphemeral")
                                         if c.params["user"] == ADMIN], what="status")[0]
    text = status.params["text"]
    assert "Queue:* 0 waiting, 0 running" in text
    assert "smollm2-135m-instruct" in text and "Approval rate (30 days):* no reviews yet" in text
    assert "Last training run:" in text

    # An admin links a channel; a message there is then a request for that repository.
    h.command(f"link {repo}", channel=UNLINKED, user=ADMIN)
    h.slack.wait_for(lambda s: any("linked this channel" in t for t in s.texts()), what="link")
    h.message("Add a whisper(text) helper", channel=UNLINKED)
    h.slack.wait_for(lambda s: any(t.startswith("Queued as") for t in s.texts()), what="queued")
    assert h.requests()[0].repo == str(repo)
    h.wait_job(h.requests()[0].jobs[0].id)


def test_slash_command_requirement_starts_a_thread_or_says_how_to_invite_the_bot(
    harness_factory, repo
):
    h = harness_factory(ScriptedBackend("no edit"))
    h.settings.pipeline.max_attempts = 1
    h.command("Add a whisper(text) helper", channel=LINKED, user=ALICE)
    queued = h.slack.wait_for(lambda s: [c for c in s.of("chat.postMessage")
                                         if c.params["text"].startswith("Queued as #1")],
                              what="queued reply")[0]
    anchor = h.slack.of("chat.postMessage")[0]
    assert anchor.params["text"] == "<@UALICE> asked for: Add a whisper(text) helper"
    assert queued.params["thread_ts"] == anchor.response["ts"]
    h.wait_job(h.requests()[0].jobs[0].id)

    h.slack.not_in.add("CPRIVATE")
    link_channel(h.store, "CPRIVATE", str(repo), ADMIN)
    h.command("Add a shout helper", channel="CPRIVATE", user=ALICE)
    hook = h.slack.wait_for(lambda s: [c for c in s.calls if c.method.startswith("response-")],
                            what="answer through response_url")[0]
    assert "/invite @codeloop" in hook.params["text"]
    assert hook.params["response_type"] == "ephemeral"
    assert len(h.requests()) == 1


def test_ratelimited_answer_is_retried(harness_factory):
    h = harness_factory()
    h.slack.ratelimit("chat.postMessage", times=1, retry_after=1)
    h.message("<@UCODELOOP> add a helper", channel=UNLINKED, kind="app_mention")
    h.slack.wait_for(lambda s: s.of("chat.postMessage"), what="the reply after the 429")
    attempts = h.slack.of("chat.postMessage", ok_only=False)
    assert [c.status for c in attempts] == [429, 200]
    assert "not linked" in attempts[1].params["text"]
    rows = h.wait_deliveries_handled()
    assert rows[0].state == "ignored"  # handled: told the person, no job


# ---------------------------------------------------------------- the thread


def test_thread_tells_the_story_and_a_follow_up_revises_the_same_pull_request(
    harness_factory, repo
):
    h = harness_factory(ScriptedBackend(GOOD, REVISED), update_interval_seconds=0.5)
    _, ts = h.message("Add a whisper(text) helper", channel=LINKED, user=ALICE)
    request = h.slack.wait_for(lambda s: [t for t in s.texts() if t.startswith("Queued")],
                               what="queued reply")
    req = h.requests()[0]
    assert request == [f"Queued as #{req.id} for {repo}"]
    job = h.wait_job(req.jobs[0].id)
    assert job.state == "succeeded", job.error

    # One progress message in the thread, edited in place; the last edit has the PR.
    posts = [c for c in h.slack.of("chat.postMessage") if c.params.get("blocks")]
    assert len(posts) == 1 and posts[0].params["thread_ts"] == ts
    in_thread = [c.params["text"] for c in h.slack.of("chat.postMessage")]
    assert in_thread[0].startswith("Queued as") and in_thread[1] == posts[0].params["text"]
    assert "Cancel" in json.dumps(posts[0].params["blocks"])
    updates = h.slack.wait_for(lambda s: [c for c in s.of("chat.update")
                                          if "Opened" in json.dumps(c.params["blocks"])],
                               what="final edit")
    every = h.slack.of("chat.update")
    assert len({c.params["ts"] for c in every}) == 1  # always the same message
    shown = final_texts(h.slack)
    assert any("reading" in t for t in shown) and any("validating" in t for t in shown)
    final = json.dumps(updates[-1].params["blocks"])
    assert "pull request #1" in final and "textutil.py" in final
    assert "Validation: *passed*" in final and "Cancel" not in final
    # Coalesced: six stage changes (workspace … publish) and the end would be one post and six
    # edits one by one; the fast stages share edits.
    assert len(every) < 6
    with h.store.session() as s:
        pr = s.scalar(select(PullRequest))
        assert "Slack user UALICE (@alice-gh)" in pr.body
        assert s.scalar(select(SlackThread)).thread_ts == ts

    # A follow-up in the thread: one more commit on the same branch.
    h.message("Use a real ellipsis character", channel=LINKED, thread_ts=ts)
    h.slack.wait_for(lambda s: any(t.startswith("Revising pull request #1") for t in s.texts()),
                     what="revising reply")
    revise_job = max(j.id for j in h.requests()[0].jobs)
    assert h.wait_job(revise_job).state == "succeeded"
    h.slack.wait_for(lambda s: [c for c in s.of("chat.update")
                                if "Pushed revision 2" in json.dumps(c.params["blocks"])],
                     what="revision's final edit")
    branch = h.job(req.jobs[0].id).result["branch"]
    assert git_out(repo, "rev-list", "--count", f"main..{branch}").strip() == "2"
    assert "…" in git_out(repo, "show", f"{branch}:textutil.py")
    assert h.count(PullRequest) == 1 and h.count(Revision) == 2
    with h.store.session() as s:  # the follow-up is kept as review feedback on revision 1
        signal = s.scalar(select(ReviewSignal))
        assert (signal.source, signal.kind, signal.body) == (
            "slack", "commented", "Use a real ellipsis character")
        assert signal.revision_id == s.scalar(select(Revision.id).where(Revision.number == 1))


def test_cancel_stops_a_running_job(harness_factory, repo):
    backend = GatedBackend(GOOD)
    h = harness_factory(backend)
    _, ts = h.message("Add a whisper(text) helper", channel=LINKED, user=ALICE)
    assert backend.entered.wait(60), "the job never reached the model"
    job_id = h.requests()[0].jobs[0].id
    assert h.job(job_id).state == "running"

    h.click(CANCEL_ACTION, job_id, channel=LINKED, user="UMALLORY")  # not theirs: refused
    h.slack.wait_for(lambda s: s.of("chat.postEphemeral"), what="refusal")
    assert h.job(job_id).state == "running"

    h.click(CANCEL_ACTION, job_id, channel=LINKED, user=ALICE)
    h.slack.wait_for(lambda s: any("cancelled #1 (job" in t for t in s.texts()),
                     what="cancel reply")
    assert h.job(job_id).state == "cancelled"
    backend.release.set()
    h.slack.wait_for(lambda s: [c for c in s.of("chat.update")
                                if "Cancelled after" in c.params.get("text", "")],
                     what="cancelled edit")
    assert h.job(job_id).state == "cancelled"
    assert h.count(PullRequest) == 0
    branches = git_out(repo, "branch", "--format=%(refname:short)").split()
    assert [b for b in branches if b.startswith("codeloop/")] == []


def test_a_failed_job_says_why_and_retry_runs_it_again(harness_factory):
    h = harness_factory(ScriptedBackend("I would add a function. Good luck!", GOOD))
    h.settings.pipeline.max_attempts = 1
    h.message("Add a whisper(text) helper", channel=LINKED, user=ALICE)
    h.slack.wait_for(lambda s: [t for t in s.texts() if t.startswith("Queued")], what="queued")
    failed_id = h.requests()[0].jobs[0].id
    assert h.wait_job(failed_id).state == "failed"
    final = h.slack.wait_for(lambda s: [c for c in s.of("chat.update")
                                        if "I could not finish" in json.dumps(c.params["blocks"])],
                             what="failure edit")[-1]
    blocks = json.dumps(final.params["blocks"])
    assert "no parsable edit" in blocks and RETRY_ACTION in blocks
    h.click(RETRY_ACTION, failed_id, channel=LINKED, user=ALICE)
    h.slack.wait_for(lambda s: any("try again" in t for t in s.texts()), what="retry reply")
    h.click(RETRY_ACTION, failed_id, channel=LINKED, user=ALICE)  # a second click: same retry
    h.slack.wait_for(lambda s: any("Already trying again" in t
                                   for t in s.texts("chat.postEphemeral")), what="already")
    jobs_ = h.requests()[0].jobs
    assert len(jobs_) == 2
    retry_id = jobs_[1].id
    assert h.wait_job(retry_id).state == "succeeded"


def test_admins_retrain_now_and_set_pause_the_schedule_from_slack(harness_factory, repo):
    from sqlalchemy import select

    from bot.store.models import TrainingRun
    from training.schedule import show_schedules

    h = harness_factory()

    def answer(text: str) -> str:
        before = len(h.slack.of("chat.postEphemeral"))
        h.command(text, channel=LINKED, user=ADMIN)
        return h.slack.wait_for(lambda s: s.of("chat.postEphemeral")[before:],
                                what=f"answer to {text!r}")[0].params["text"]

    queued = answer("retrain now")
    with h.store.session() as s:
        run = s.scalar(select(TrainingRun))
    assert run is not None and run.repo == str(repo) and run.requested_by == ADMIN
    assert queued == f"Training run #{run.id} queued for {repo}."

    assert answer("schedule 0 3 * * 1").startswith(f"Retraining {repo}:")
    [sched] = show_schedules(h.settings)
    assert sched["repo"] == str(repo) and sched["cron"] == "0 3 * * 1" and not sched["paused"]

    assert "not accepted" in answer("schedule every tuesday-ish")
    assert show_schedules(h.settings)[0]["cron"] == "0 3 * * 1"  # the bad one changed nothing

    assert answer("schedule off") == f"Retraining for {repo} is paused."
    assert show_schedules(h.settings)[0]["paused"]
