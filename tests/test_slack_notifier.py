"""The progress message: one post, edits coalesced inside the update interval, the end always
last. Real store, real slack_sdk client, local Slack Web API server."""

from __future__ import annotations

import json
import time

import pytest

from bot import jobs
from bot.slack.app import web_client
from bot.slack.notifier import SlackNotifier
from bot.store.db import Store
from tests.support import make_settings
from tests.slack_harness import slack_settings
from tests.slack_server import SlackAPIServer


@pytest.fixture
def slack_api():
    server = SlackAPIServer().start()
    yield server
    server.stop()


def _setup(tmp_path, slack_api, interval):
    settings = make_settings(tmp_path / "home", slack=slack_settings(slack_api.api_url))
    store = Store(settings.database_url)
    sub = jobs.submit(store, source="slack", repo="acme/api", requirement="add a flag",
                      max_bytes=1000, reply_to={"channel": "C1", "thread_ts": "1.0"})
    return store, sub.job_id, SlackNotifier(store, web_client(settings), interval=interval)


def test_a_burst_of_stages_is_one_post_and_the_final_edit(tmp_path, slack_api):
    store, job_id, notifier = _setup(tmp_path, slack_api, interval=5.0)
    for n in range(10):
        notifier.stage(job_id, f"generate-{n + 1}", f"generating (attempt {n + 1})")
    jobs.cancel(store, job_id)
    notifier.finished(job_id, "cancelled", ok=False)
    time.sleep(0.3)
    posts, edits = slack_api.of("chat.postMessage"), slack_api.of("chat.update")
    # The progress message, then one new message telling the end (edits notify nobody).
    posts, notice = posts[:-1], posts[-1]
    assert notice.params["thread_ts"] == "1.0" and "was cancelled" in notice.params["text"]
    assert len(posts) == 1 and posts[0].params["thread_ts"] == "1.0"
    assert "attempt 1" in posts[0].params["text"]
    assert len(edits) == 1 and "Cancelled after" in edits[0].params["text"]
    assert edits[0].params["ts"] == posts[0].response["ts"]
    store.close()


def test_a_pending_edit_is_sent_when_the_window_ends(tmp_path, slack_api):
    store, job_id, notifier = _setup(tmp_path, slack_api, interval=0.3)
    notifier.stage(job_id, "workspace", "reading api")
    notifier.stage(job_id, "context", "finding the files that matter")
    notifier.stage(job_id, "prompt", "writing the prompt")
    assert slack_api.of("chat.update") == []  # inside the window: held back
    edit = slack_api.wait_for(lambda s: s.of("chat.update"), timeout=5, what="coalesced edit")
    assert len(edit) == 1
    shown = json.dumps(edit[0].params["blocks"])
    assert "writing the prompt" in shown and "finding the files" not in shown  # newest wins
    store.close()
