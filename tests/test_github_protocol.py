"""GitHub as it really behaves (issue 15, items 1-8): the bot's identity from the API,
redelivery, a pull request's whole life, both webhook content types, line-comment mentions,
follow-ups while a job runs, and comments that cost nothing.

Deliveries are GitHub's published example payloads (octokit/webhooks, tests/fixtures/github)
pointed at the local GitHub server, signed and POSTed to the real route; a real huey queue
runs the handler; the model answer is scripted at the Backend port.
"""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import func, select

from bot.store.models import (
    Delivery,
    GitHubReviewReply,
    Job,
    MergedChange,
    PullRequest,
    Request,
    ReviewSignal,
)
from tests.fakes import ScriptedBackend
from tests.github_harness import make_env, octokit
from tests.test_github_flow import FILES, GOOD, ISSUE_BODY, ISSUE_TITLE, REVISED, git

THIRD = REVISED.replace("trailing off.", "trailing off (third).")


def labeled(env, issue: int, label: str, sender: str, **issue_over) -> dict:
    issue_json = {**env.fake.issue_json(env.fake.url, env.repo, issue), **issue_over}
    return octokit(
        "issues.labeled", env.fake, env.repo, sender,
        issue=issue_json, label=env.fake.label_json(env.fake.url, env.repo, label),
    )


def commented(env, issue: int, cid: int) -> dict:
    c = env.repo.comments[cid]
    return octokit(
        "issue_comment.created", env.fake, env.repo, c["user"],
        issue=env.fake.issue_json(env.fake.url, env.repo, issue),
        comment=env.fake.comment_json(env.fake.url, env.repo, cid),
    )


def pull_event(env, action: str, number: int, sender: str, **pull_over) -> dict:
    pull = {**env.fake.pull_json(env.fake.url, env.repo, number), **pull_over}
    return octokit(f"pull_request.{action}", env.fake, env.repo, sender, number=number,
                   pull_request=pull)


def review_event(env, action: str, number: int, review_id: int, **review_over) -> dict:
    review = env.repo.reviews[review_id]
    rj = {**env.fake.review_json(env.fake.url, env.repo, review_id),
          "state": review["state"].lower(), **review_over}
    return octokit(f"pull_request_review.{action}", env.fake, env.repo, review["user"],
                   review=rj, pull_request=env.fake.pull_json(env.fake.url, env.repo, number))


def review_comment_event(env, number: int, cid: int) -> dict:
    c = env.repo.review_comments[cid]
    comment = env.fake.review_comment_json(env.fake.url, env.repo, cid)
    example = octokit("pull_request_review_comment.created", env.fake, env.repo, c["user"])
    example["comment"].pop("in_reply_to_id", None)  # the example is a top-level comment
    return {**example, "comment": {**example["comment"], **comment},
            "pull_request": {**example["pull_request"],
                             **env.fake.pull_json(env.fake.url, env.repo, number)}}


def start_pr(env, delivery_id: str = "d-label-1") -> tuple[int, int]:
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    answer = env.deliver("issues", labeled(env, issue, "codeloop", "alice"), delivery_id)
    assert answer.status_code == 202, answer.text
    env.work()
    assert len(env.repo.pulls) == 1, env.fake.comments_on(env.repo, issue)
    return issue, next(iter(env.repo.pulls))


def notes(env) -> dict[str, str | None]:
    with env.runtime.store.session() as s:
        return dict(s.execute(select(Delivery.delivery_id, Delivery.note)).all())


def count(env, model, *where) -> int:
    with env.runtime.store.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path, ScriptedBackend(GOOD, REVISED, THIRD), files=FILES)
    yield e
    e.close()


@pytest.fixture
def env_db(tmp_path, db_url):
    e = make_env(tmp_path, ScriptedBackend(GOOD, REVISED, THIRD), db_url=db_url, files=FILES)
    yield e
    e.close()


# ---------------------------------------------------------------- item 1: identity


def test_with_a_personal_token_the_bot_never_triggers_itself(tmp_path):
    """The token's owner (a person with admin rights) is the bot: its refusal comment does
    not name the trigger, and GitHub's delivery of its own comments starts nothing."""
    env = make_env(tmp_path, ScriptedBackend(GOOD, REVISED, THIRD), files=FILES,
                   pat_owner="octo-admin")
    try:
        issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "mallory")
        env.deliver("issues", labeled(env, issue, "codeloop", "mallory"))
        env.work()
        (refusal,) = env.fake.comments_on(env.repo, issue)
        assert refusal["user"] == "octo-admin"  # GitHub posts it as the token's owner
        assert "@mallory" in refusal["body"] and "@codeloop" not in refusal["body"].lower()
        assert "label" not in refusal["body"]
        assert ("GET", "/api/v3/user", 200) in env.fake.log  # identity asked from the API
        # GitHub delivers the bot's own comment back; even one that mentions the bot.
        cid = next(c for c, v in env.repo.comments.items() if v["user"] == "octo-admin")
        env.deliver("issue_comment", commented(env, issue, cid), "d-own")
        own2 = env.fake.add_comment(env.repo, issue, "@codeloop please", "octo-admin")
        env.deliver("issue_comment", commented(env, issue, own2), "d-own-2")
        env.work()
        assert count(env, Job) == 0
        assert "codeloop itself" in notes(env)["d-own-2"]

        # A revision: its replies (posted as octo-admin) are neither signals nor re-answered.
        issue2, number = start_pr(env)
        rid, (cid1,) = env.fake.add_review(env.repo, number, "alice", "CHANGES_REQUESTED", "",
                                           comments=[("textutil.py", 3, "Docstring please.")])
        env.deliver("pull_request_review", review_event(env, "submitted", number, rid))
        env.deliver("pull_request_review_comment", review_comment_event(env, number, cid1))
        env.work()
        replies = [c for c, v in env.repo.review_comments.items() if v["in_reply_to"] == cid1]
        assert len(replies) == 1 and env.repo.review_comments[replies[0]]["user"] == "octo-admin"
        env.deliver("pull_request_review_comment",
                    review_comment_event(env, number, replies[0]), "d-own-reply")
        rid2, _ = env.fake.add_review(env.repo, number, "alice", "CHANGES_REQUESTED", "More.")
        env.deliver("pull_request_review", review_event(env, "submitted", number, rid2))
        env.work()
        again = [c for c, v in env.repo.review_comments.items() if v["in_reply_to"] == cid1]
        assert again == replies  # the answered comment is not answered a second time
        assert count(env, ReviewSignal, ReviewSignal.kind == "line_comment") == 1
        assert "codeloop itself" in notes(env)["d-own-reply"]
    finally:
        env.close()


def test_an_app_knows_its_slug_from_the_api_even_when_bot_login_differs(tmp_path):
    """The App is `acme-codeloop[bot]`; `bot_login` was left at its default."""
    env = make_env(tmp_path, ScriptedBackend(GOOD, REVISED), files=FILES, app_slug="acme-codeloop")
    try:
        issue, number = start_pr(env)
        mine = [c for c in env.fake.comments_on(env.repo, issue)]
        assert mine and {c["user"] for c in mine} == {"acme-codeloop[bot]"}
        assert ("GET", "/api/v3/app", 200) in env.fake.log
        # Its own status comment, delivered back with a human-looking sender, is ignored.
        payload = commented(env, issue, env.fake.add_comment(env.repo, issue, "@codeloop x",
                                                            "acme-codeloop[bot]"))
        payload["sender"]["type"] = payload["comment"]["user"]["type"] = "User"
        env.deliver("issue_comment", payload, "d-self")
        env.work()
        assert "codeloop itself" in notes(env)["d-self"]
    finally:
        env.close()


# ---------------------------------------------------------------- item 5: redelivery


def test_redeliver_of_a_failed_delivery_is_handled_again(env_db):
    env = env_db
    env.fake.fail_next("GET", r"/collaborators/alice/permission$", 502, message="Bad Gateway",
                       times=5)
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    payload = labeled(env, issue, "codeloop", "alice")
    assert env.deliver("issues", payload, "d-redeliver").status_code == 202
    env.work()
    with env.runtime.store.session() as s:
        assert s.scalar(select(Delivery.state)) == "failed"
    assert env.repo.pulls == {}
    # GitHub's "Redeliver": same X-GitHub-Delivery, same body. GitHub is healthy again.
    again = env.deliver("issues", payload, "d-redeliver")
    assert again.status_code == 202 and again.json()["retry"] is True
    env.work()
    assert len(env.repo.pulls) == 1
    with env.runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 1
        assert s.scalar(select(Delivery.state)) == "handled"
    # A handled delivery redelivered is a duplicate, not a second job.
    third = env.deliver("issues", payload, "d-redeliver")
    assert third.status_code == 200 and third.json()["duplicate"] is True
    assert env.work() == 0
    assert count(env, Request) == 1


# ---------------------------------------------------------------- item 3: lifecycle


def test_closed_reopened_then_revised_and_merged(env_db):
    env = env_db
    issue, number = start_pr(env)
    branch = env.repo.pulls[number]["head"]
    env.fake.close_pull(env.repo, number)
    env.deliver("pull_request", pull_event(env, "closed", number, "alice"))
    env.work()
    env.fake.reopen_pull(env.repo, number)
    env.deliver("pull_request", pull_event(env, "reopened", number, "alice"))
    env.work()
    with env.runtime.store.session() as s:
        assert s.scalar(select(PullRequest.state)) == "open"
    # "Request changes" after the reopen is a revision, not dropped.
    rid, _ = env.fake.add_review(env.repo, number, "alice", "CHANGES_REQUESTED", "Docstring.")
    env.deliver("pull_request_review", review_event(env, "submitted", number, rid))
    env.work()
    assert git(env, "rev-list", "--count", f"main..{branch}").strip() == "2"
    merged_sha = env.fake.merge_pull(env.repo, number)
    merged_at = "2026-11-29T12:34:56Z"
    env.deliver("pull_request", pull_event(env, "closed", number, "alice", merged_at=merged_at))
    env.work()
    with env.runtime.store.session() as s:
        pr = s.scalar(select(PullRequest))
        assert pr.state == "merged"
        assert pr.merged_at.isoformat() == "2026-11-29T12:34:56"  # the payload's, not now
        kinds = [sig.kind for sig in pr.signals]
        assert kinds == ["closed_unmerged", "changes_requested", "merged"]
        change = s.scalar(select(MergedChange))
        assert change.merge_sha == merged_sha and change.merged_at == pr.merged_at


# ---------------------------------------------------------------- item 2: form-encoded


def test_form_encoded_deliveries_are_accepted(env):
    ping = octokit("ping", env.fake, env.repo, "acme")
    answer = env.deliver("ping", ping, form=True)
    assert answer.status_code == 200 and answer.json()["ok"] is True
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    answer = env.deliver("issues", labeled(env, issue, "codeloop", "alice"), form=True)
    assert answer.status_code == 202, answer.text
    env.work()
    assert len(env.repo.pulls) == 1
    # A signed form without `payload=` is a clear 400, and nothing is stored.
    from bot.github.webhook import sign
    from tests.github_harness import WEBHOOK_SECRET

    for body in (b"other=1", b"payload=%7B&payload=%7B", b"payload=not-json"):
        bad = env.client.post(
            "/github/webhook", content=body,
            headers={"X-GitHub-Event": "issues", "X-GitHub-Delivery": "d-bad",
                     "Content-Type": "application/x-www-form-urlencoded",
                     "X-Hub-Signature-256": sign(WEBHOOK_SECRET, body)},
        )
        assert bad.status_code == 400 and "payload" in bad.json()["error"]
    assert count(env, Delivery, Delivery.delivery_id == "d-bad") == 0


# ---------------------------------------------------------------- item 7


def test_labels_issue_state_branches_dismissals_and_thread_replies(env):
    # A closed issue and a locked one start nothing, even with the right label.
    closed = env.fake.open_issue(env.repo, "Closed one", "x", "alice")
    env.deliver("issues", labeled(env, closed, "codeloop", "alice", state="closed"), "d-closed")
    locked = env.fake.open_issue(env.repo, "Locked one", "x", "alice")
    env.deliver("issues", labeled(env, locked, "codeloop", "alice", locked=True), "d-locked")
    env.work()
    assert count(env, Job) == 0
    n = notes(env)
    assert "closed" in n["d-closed"] and "locked" in n["d-locked"]
    # The label is compared as GitHub does: without case.
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    assert env.deliver("issues", labeled(env, issue, "CodeLoop", "alice")).status_code == 202
    env.work()
    number = next(iter(env.repo.pulls))
    # A dismissed "changes requested" no longer counts as one.
    rid, (cid,) = env.fake.add_review(env.repo, number, "alice", "CHANGES_REQUESTED", "No.",
                                      comments=[("textutil.py", 3, "Why?")])
    env.deliver("pull_request_review", review_event(env, "submitted", number, rid))
    env.deliver("pull_request_review_comment", review_comment_event(env, number, cid))
    env.work()
    env.deliver("pull_request_review", review_event(env, "dismissed", number, rid,
                                                    state="dismissed"))
    # A reply inside the review thread is conversation, not a new line comment.
    reply = env.fake.add_review_reply(env.repo, cid, "alice", "Never mind, it is fine.")
    env.deliver("pull_request_review_comment", review_comment_event(env, number, reply), "d-rep")
    env.work()
    with env.runtime.store.session() as s:
        kinds = sorted(s.scalars(select(ReviewSignal.kind)).all())
    assert kinds == ["dismissed", "line_comment"]
    assert "reply inside a review thread" in notes(env)["d-rep"]
    # A merge into a release branch is stored with its branch; the dataset leaves it out
    # (only the default branch and `.codeloop.yml` training_branches are training material).
    from datetime import datetime, timezone

    from tests.github_history import git as git_in, merge, person_pr

    env.repo.permissions["bob"] = "write"
    work = env.repo.path.parent / "bob-work"
    subprocess.run(["git", "clone", "-q", str(env.repo.path), str(work)], check=True)
    git_in(work, "push", "-q", "origin", "main:release-1.x")
    other = person_pr(env, work, "backport", "release-1.x", "BACKPORT.txt", "1.x\n",
                      "Backport", "to 1.x")
    merge(env, other, datetime(2026, 11, 29, 10, 0, tzinfo=timezone.utc), sender="bob")
    with env.runtime.store.session() as s:
        assert s.scalars(select(MergedChange.base_ref)).all() == ["release-1.x"]


# ---------------------------------------------------------------- item 4


def test_a_mention_in_a_line_comment_starts_a_revision(env_db):
    env = env_db
    issue, number = start_pr(env)
    branch = env.repo.pulls[number]["head"]
    rid, (cid,) = env.fake.add_review(env.repo, number, "alice", "COMMENTED", "",
                                      comments=[("textutil.py", 14, "@codeloop add a docstring")])
    # GitHub sends the (empty, "commented") review and its comment; one revision results.
    env.deliver("pull_request_review", review_event(env, "submitted", number, rid))
    env.deliver("pull_request_review_comment", review_comment_event(env, number, cid))
    env.work()
    assert git(env, "rev-list", "--count", f"main..{branch}").strip() == "2"
    assert count(env, Job, Job.kind == "revise") == 1
    with env.runtime.store.session() as s:
        assert s.scalar(select(GitHubReviewReply.comment_id)) == cid
    replies = [v for v in env.repo.review_comments.values() if v["in_reply_to"] == cid]
    assert len(replies) == 1 and replies[0]["body"].startswith("Addressed in")


# ---------------------------------------------------------------- item 6


def test_a_follow_up_while_the_job_is_queued_is_answered(env):
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    env.deliver("issues", labeled(env, issue, "codeloop", "alice"))
    env.handle_next_delivery()  # the label is handled; its job waits on the jobs queue
    cid = env.fake.add_comment(env.repo, issue, "@codeloop also handle empty strings", "alice")
    env.deliver("issue_comment", commented(env, issue, cid), "d-follow")
    env.handle_next_delivery()  # deliveries have their own consumer: answered before the job
    with env.runtime.store.session() as s:
        assert s.scalar(select(Job.state)) == "queued"
    env.work()
    said = [c["body"] for c in env.fake.comments_on(env.repo, issue)
            if c["user"] == "codeloop[bot]" and "still working" in c["body"]]
    assert len(said) == 1 and "@alice" in said[0] and "job 1" in said[0]
    assert "@codeloop" not in said[0]
    assert "already queued or running" in notes(env)["d-follow"]


# ---------------------------------------------------------------- item 8


def test_a_comment_without_a_mention_costs_no_github_call(env):
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    cid = env.fake.add_comment(env.repo, issue, "Looks like a duplicate of #3.", "alice")
    before = len(env.fake.log)
    env.deliver("issue_comment", commented(env, issue, cid), "d-chat")
    env.work()
    assert env.fake.log[before:] == [] and env.fake.tokens_issued == 0
    assert "does not mention @codeloop" in notes(env)["d-chat"]


def test_junk_bodies_get_400_and_store_nothing(env):
    """Signed, but not a payload: absurd nesting, a JSON array, a form with two payloads."""
    from bot.github.webhook import sign
    from tests.github_harness import WEBHOOK_SECRET

    for body, kind in ((b"[" * 200_000 + b"]" * 200_000, "application/json"),
                       (b"[1, 2]", "application/json"),
                       (b"payload=%7B%7D&payload=%7B%7D", "application/x-www-form-urlencoded")):
        answer = env.client.post(
            "/github/webhook", content=body,
            headers={"X-GitHub-Event": "issues", "X-GitHub-Delivery": "d-junk",
                     "Content-Type": kind, "X-Hub-Signature-256": sign(WEBHOOK_SECRET, body)})
        assert answer.status_code == 400, answer.text
    from bot.github.webhook import MAX_BODY_BYTES

    chunk = b"x" * (1024 * 1024)
    chunked = env.client.post(  # no Content-Length: read only up to the limit
        "/github/webhook", content=iter([chunk] * (MAX_BODY_BYTES // len(chunk) + 2)),
        headers={"X-GitHub-Event": "issues", "X-GitHub-Delivery": "d-big"})
    assert chunked.status_code == 413
    assert count(env, Delivery) == 0
