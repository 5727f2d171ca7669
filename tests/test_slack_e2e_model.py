"""End to end with the real embedded model: a message in a linked Slack channel becomes a
pull request on the local forge, told in the thread; a follow-up in the thread adds one
commit to the same pull request. Slack's side is signed HTTP to codeloop's web server and
a local Slack Web API server."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from bot.demo import DEMO_REQUIREMENT, make_sample_repo
from bot.slack.handler import link_channel
from bot.store.models import JobStage, PullRequest
from tests.support import git_out, make_settings
from tests.slack_harness import ADMIN, ALICE, Harness, final_texts, slack_settings
from tests.slack_server import SlackAPIServer

pytestmark = pytest.mark.model

CHANNEL = "CTEXTUTIL"
FOLLOW_UP = ("Also add a function count_words(text) to textutil.py that returns how many "
             "words the text contains.")


def test_message_in_a_linked_channel_to_pull_request_and_follow_up_commit(
    tmp_path, embedded_backend
):
    repo = make_sample_repo(tmp_path / "repo")
    slack = SlackAPIServer().start()
    settings = make_settings(tmp_path / "home", slack=slack_settings(slack.api_url))
    h = Harness(settings, slack, embedded_backend).start()
    try:
        link_channel(h.store, CHANNEL, str(repo), ADMIN)
        _, ts = h.message(DEMO_REQUIREMENT, channel=CHANNEL, user=ALICE)
        queued = slack.wait_for(lambda s: [c for c in s.of("chat.postMessage")
                                           if c.params["text"].startswith("Queued as #1")],
                                what="queued reply")
        assert queued[0].params["thread_ts"] == ts
        job = h.wait_job(h.requests()[0].jobs[0].id, timeout=600)
        assert job.state == "succeeded", job.error

        final = slack.wait_for(lambda s: [c for c in s.of("chat.update")
                                          if "Opened" in json.dumps(c.params["blocks"])],
                               what="final edit")[-1]
        shown = final_texts(slack)
        for stage in ("reading", "finding the files", "generating", "validating"):
            assert any(stage in t for t in shown), (stage, shown)
        blocks = json.dumps(final.params["blocks"])
        assert "pull request #1" in blocks and "textutil.py" in blocks
        assert "Validation: *passed*" in blocks
        branch = job.result["branch"]
        assert "def count_vowels" in git_out(repo, "show", f"{branch}:textutil.py")
        with h.store.session() as s:
            gen = s.scalar(select(JobStage).where(JobStage.name.like("generate-%")))
            assert gen.output["completion_tokens"] > 0  # the model really generated

        h.message(FOLLOW_UP, channel=CHANNEL, thread_ts=ts, user=ALICE)
        slack.wait_for(lambda s: any(t.startswith("Revising pull request #1")
                                     for t in s.texts()), what="revising reply")
        revise = max(j.id for j in h.requests()[0].jobs)
        second = h.wait_job(revise, timeout=600)
        assert second.state == "succeeded", second.error
        assert second.result["branch"] == branch and second.result["revision"] == 2
        assert git_out(repo, "rev-list", "--count", f"main..{branch}").strip() == "2"
        assert "def count_words" in git_out(repo, "show", f"{branch}:textutil.py")
        slack.wait_for(lambda s: [c for c in s.of("chat.update")
                                  if "Pushed revision 2" in json.dumps(c.params["blocks"])],
                       what="revision's final edit")
        with h.store.session() as s:
            pr = s.scalar(select(PullRequest))
            assert len(pr.revisions) == 2 and [r.trigger for r in pr.revisions][0] == "initial"
            assert "Slack user UALICE (@alice-gh)" in pr.body
    finally:
        h.stop()
        slack.stop()
