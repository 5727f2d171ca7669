"""GitHub end to end against the local GitHub server: signed deliveries → jobs → pull
requests, reviews → revisions and signals, merges → training material. The model answer is
scripted (a fake at the Backend port); tests/test_github_model.py runs the real model."""

from __future__ import annotations

import logging
import subprocess
import threading

import pytest
from sqlalchemy import func, select

from bot.demo import SAMPLE_FILES
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
from tests.github_harness import REPO, make_env
from tests.github_server import BOT_LOGIN

HELPERS = '''"""Small text helpers."""


def slugify(text):
    """Lower-case words joined by dashes."""
    return "-".join(text.lower().split())


def shout(text):
    """Upper-case text with an exclamation mark."""
    return text.upper() + "!"
'''
GOOD = (
    f"textutil.py\n```python\n{HELPERS}\n\ndef whisper(text):\n"
    '    return text.lower() + "..."\n```\n'
)
REVISED = (
    f"textutil.py\n```python\n{HELPERS}\n\ndef whisper(text):\n"
    '    """Lower-case text trailing off."""\n    return text.lower() + "..."\n```\n'
)
FILES = {
    **SAMPLE_FILES,
    ".codeloop.yml": "test_command: python -m pytest -q\nlabels: [codeloop-pr]\n",
}
ISSUE_TITLE = "Add a whisper(text) helper"
ISSUE_BODY = "whisper(text) returns the text in lower case followed by '...'."


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path, ScriptedBackend(GOOD, REVISED), files=FILES)
    yield e
    e.close()


@pytest.fixture
def env_any_db(tmp_path, db_url):
    """The same, on SQLite and on PostgreSQL (GitHub's ids exceed 32 bits)."""
    e = make_env(tmp_path, ScriptedBackend(GOOD, REVISED), db_url=db_url, files=FILES)
    yield e
    e.close()


def bot_comments(env, number: int) -> list[dict]:
    return [c for c in env.fake.comments_on(env.repo, number) if c["user"] == BOT_LOGIN]


def git(env, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=env.repo.path, check=True, capture_output=True, text=True
    ).stdout


def open_pr(env, delivery_id: str = "d-label-1") -> tuple[int, int]:
    """Issue by alice, labelled → the bot's pull request. Returns (issue, pull number)."""
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    answer = env.deliver(
        "issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"), delivery_id
    )
    assert answer.status_code == 202, answer.text
    env.work()
    assert len(env.repo.pulls) == 1, env.fake.comments_on(env.repo, issue)
    return issue, next(iter(env.repo.pulls))


def test_labelled_issue_becomes_one_pull_request_with_progress(env, caplog):
    caplog.set_level(logging.DEBUG)
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    payload = env.fake.issue_labeled(env.repo, issue, "codeloop", "alice")
    first = env.deliver("issues", payload, "d-1")
    again = env.deliver("issues", payload, "d-1")  # GitHub redelivers
    assert first.status_code == 202 and again.status_code == 200 and again.json()["duplicate"]
    env.work()

    assert len(env.repo.pulls) == 1
    number, pull = next(iter(env.repo.pulls.items()))
    branch = pull["head"]
    assert branch.startswith(f"codeloop/{issue}-add-a-whisper-text-helper")
    # The branch holds one commit on main, with the change.
    assert git(env, "rev-list", "--count", f"main..{branch}").strip() == "1"
    assert "def whisper" in git(env, "show", f"{branch}:textutil.py")
    body = env.repo.issues[number]["body"]
    assert f"Closes #{issue}" in body and ISSUE_BODY in body
    assert "no test exercises the new code" in body and "`scripted`" in body
    assert env.repo.issues[number]["labels"] == ["codeloop-pr"]  # from .codeloop.yml
    # 👀 on the issue, one status comment edited in place, ending with the PR link.
    assert [(r["on"], r["target"], r["content"]) for r in env.repo.reactions] == [
        ("issue", issue, "eyes")
    ]
    status = bot_comments(env, issue)
    assert len(status) == 1 and status[0]["edits"] >= 4
    pr_url = f"{env.fake.url}/{REPO}/pull/{number}"
    assert status[0]["body"].rstrip().endswith(pr_url)
    with env.runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 1
        assert s.scalar(select(Delivery.state)) == "handled"
        pr = s.scalar(select(PullRequest))
        assert (pr.forge, pr.repo, pr.number, pr.url) == ("github", REPO, number, pr_url)

    # A later trigger on the same issue revises the open pull request instead of opening one.
    comment = env.fake.issue_commented(env.repo, issue, "@codeloop add a docstring too", "alice")
    assert env.deliver("issue_comment", comment).status_code == 202
    env.work()
    assert len(env.repo.pulls) == 1
    assert git(env, "rev-list", "--count", f"main..{branch}").strip() == "2"
    assert "Lower-case text trailing off" in git(env, "show", f"{branch}:textutil.py")

    # Tokens never reach logs, comments, the pull request or the workspace's git config.
    tokens = list(env.fake.tokens)
    assert tokens
    texts = [caplog.text, env.repo.issues[number]["body"]]
    texts += [c["body"] for c in env.fake.comments_on(env.repo, issue)]
    for config in (env.settings.home / "workspaces").glob("*/.git/config"):
        texts.append(config.read_text())
    for config in (env.settings.home / "mirrors").glob("*/config"):
        texts.append(config.read_text())
    assert not [t for t in tokens for text in texts if t in text]


def test_user_without_write_permission_gets_one_comment_and_no_job(env):
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "mallory")
    answer = env.deliver("issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "mallory"))
    assert answer.status_code == 202
    env.work()
    comments = bot_comments(env, issue)
    assert len(comments) == 1
    assert "@mallory" in comments[0]["body"] and "write access" in comments[0]["body"]
    assert env.repo.pulls == {} and env.repo.reactions == []
    with env.runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
        delivery = s.scalar(select(Delivery))
        assert delivery.state == "ignored" and "'read' permission" in delivery.note


def test_other_labels_and_bot_comments_start_nothing(env):
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    env.deliver("issues", env.fake.issue_labeled(env.repo, issue, "bug", "alice"))
    env.deliver(
        "issue_comment", env.fake.issue_commented(env.repo, issue, "@codeloop-ci hi", "alice")
    )
    env.deliver(
        "issue_comment", env.fake.issue_commented(env.repo, issue, "@codeloop go", BOT_LOGIN)
    )
    env.work()
    with env.runtime.store.session() as s:
        notes = s.scalars(select(Delivery.note).order_by(Delivery.id)).all()
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert "not the trigger label" in notes[0]
    assert "does not mention @codeloop" in notes[1]
    assert "bot" in notes[2]
    assert [c["body"] for c in bot_comments(env, issue)] == ["@codeloop go"]  # only its own
    assert env.repo.reactions == []


def test_changes_requested_with_two_line_comments_is_one_commit_and_two_replies(env_any_db):
    env = env_any_db
    issue, number = open_pr(env)
    branch = env.repo.pulls[number]["head"]
    before = env.fake.branch_sha(env.repo, branch)
    review_id, comment_ids = env.fake.add_review(
        env.repo,
        number,
        "alice",
        "CHANGES_REQUESTED",
        "Almost there.",
        comments=[
            ("textutil.py", 14, "Give whisper a docstring."),
            ("tests/test_textutil.py", 9, "Add a test for whisper."),
        ],
    )
    # GitHub sends the review and each of its line comments as separate deliveries.
    assert (
        env.deliver(
            "pull_request_review", env.fake.review_submitted(env.repo, number, review_id)
        ).status_code
        == 202
    )
    for cid in comment_ids:
        env.deliver(
            "pull_request_review_comment", env.fake.review_comment_created(env.repo, number, cid)
        )
    env.work()

    # One new commit on the same branch, addressing both comments together.
    assert git(env, "rev-list", "--count", f"{before}..{branch}").strip() == "1"
    assert "Lower-case text trailing off" in git(env, "show", f"{branch}:textutil.py")
    assert len(env.repo.pulls) == 1
    # A reply on each comment saying what was done or why not.
    replies = {
        c["in_reply_to"]: c["body"]
        for c in env.repo.review_comments.values()
        if c["user"] == BOT_LOGIN
    }
    assert set(replies) == set(comment_ids)
    assert replies[comment_ids[0]].startswith("Addressed in")
    assert replies[comment_ids[1]].startswith("Not changed in")
    with env.runtime.store.session() as s:
        signals = s.scalars(select(ReviewSignal).order_by(ReviewSignal.id)).all()
        assert sorted(sig.kind for sig in signals) == [
            "changes_requested",
            "line_comment",
            "line_comment",
        ]
        assert {(sig.path, sig.line) for sig in signals if sig.kind == "line_comment"} == {
            ("textutil.py", 14),
            ("tests/test_textutil.py", 9),
        }
        assert all(sig.model_version == "scripted" for sig in signals)
        pr = s.scalar(select(PullRequest))
        assert [r.trigger for r in pr.revisions] == ["initial", "review"]
        assert all(sig.revision_id == pr.revisions[0].id for sig in signals)
        job = s.scalar(select(Job).where(Job.kind == "revise"))
        assert job.state == "succeeded"
        assert "Give whisper a docstring." in job.feedback and "Add a test" in job.feedback
        assert (
            s.scalar(
                select(func.count())
                .select_from(GitHubReviewReply)
                .where(GitHubReviewReply.reply_id.is_not(None))
            )
            == 2
        )
    # The revision's progress is one status comment on the pull request.
    on_pr = bot_comments(env, number)
    assert len(on_pr) == 1 and on_pr[0]["body"].rstrip().endswith(
        f"{env.fake.url}/{REPO}/pull/{number}"
    )


def test_a_branch_deleted_before_the_revision_ends_it_with_a_message(env):
    issue, number = open_pr(env)
    env.fake.delete_branch(env.repo, env.repo.pulls[number]["head"])
    review_id, (cid,) = env.fake.add_review(
        env.repo,
        number,
        "alice",
        "CHANGES_REQUESTED",
        "",
        comments=[("textutil.py", 3, "Rename this.")],
    )
    env.deliver("pull_request_review", env.fake.review_submitted(env.repo, number, review_id))
    env.work()
    with env.runtime.store.session() as s:
        job = s.scalar(select(Job).where(Job.kind == "revise"))
        assert job.state == "failed" and "was deleted" in job.error
    status = bot_comments(env, number)
    assert len(status) == 1 and "was deleted" in status[0]["body"]
    reply = [c for c in env.repo.review_comments.values() if c["in_reply_to"] == cid]
    assert len(reply) == 1 and "could not revise" in reply[0]["body"]


def test_merged_and_closed_unmerged_outcomes_are_stored(env):
    issue, number = open_pr(env)
    env.deliver(
        "pull_request_review",
        env.fake.review_submitted(
            env.repo, number, env.fake.add_review(env.repo, number, "alice", "APPROVED", "LGTM")[0]
        ),
    )
    merge_sha = env.fake.merge_pull(env.repo, number)
    assert (
        env.deliver("pull_request", env.fake.pull_closed(env.repo, number, "alice")).status_code
        == 202
    )
    env.work()
    with env.runtime.store.session() as s:
        pr = s.scalar(select(PullRequest))
        assert pr.state == "merged" and pr.merged_at is not None
        assert [sig.kind for sig in pr.signals] == ["approved", "merged"]
        change = s.scalar(select(MergedChange))
        assert (change.repo, change.external_id, change.by_bot) == (REPO, str(number), True)
        assert change.merge_sha == merge_sha and change.pull_request_id == pr.id
        assert change.issue_number == issue and change.issue_body == ISSUE_BODY
        assert change.title == ISSUE_TITLE and f"Closes #{issue}" in change.body
        assert "+def whisper(text):" in change.diff and "+++ b/textutil.py" in change.diff

    # A second issue → a second pull request, closed without merging.
    issue2 = env.fake.open_issue(env.repo, "Add a yell(text) helper", "yell it", "alice")
    env.deliver("issues", env.fake.issue_labeled(env.repo, issue2, "codeloop", "alice"))
    env.work()
    number2 = max(env.repo.pulls)
    assert number2 != number
    env.fake.close_pull(env.repo, number2)
    env.deliver("pull_request", env.fake.pull_closed(env.repo, number2, "alice"))
    env.work()
    with env.runtime.store.session() as s:
        pr2 = s.scalar(select(PullRequest).where(PullRequest.number == number2))
        assert pr2.state == "closed" and [sig.kind for sig in pr2.signals] == ["closed_unmerged"]
        assert s.scalar(select(func.count()).select_from(MergedChange)) == 1


def test_every_merged_pull_request_of_the_repository_is_stored(env):
    """A person's pull request, not the bot's: stored as training material, no signal."""
    work = env.settings.home.parent / "person"
    subprocess.run(["git", "clone", "-q", str(env.repo.path), str(work)], check=True)
    (work / "textutil.py").write_text(HELPERS + "\n\ndef title(text):\n    return text.title()\n")
    subprocess.run(["git", "-C", str(work), "checkout", "-qb", "feature"], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(work),
            "-c",
            "user.name=Bob",
            "-c",
            "user.email=b@x",
            "commit",
            "-qam",
            "title()",
        ],
        check=True,
    )
    subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "feature"], check=True)
    issue = env.fake.open_issue(env.repo, "Need title()", "Title-case helper please", "bob")
    number = env.fake.open_issue(env.repo, "Add title()", f"Fixes #{issue}", "bob")
    env.repo.issues[number]["pull"] = True
    env.repo.pulls[number] = {
        "id": env.fake.next_id(),
        "head": "feature",
        "base": "main",
        "state": "open",
        "merged": False,
    }
    env.fake.merge_pull(env.repo, number)
    env.deliver("pull_request", env.fake.pull_closed(env.repo, number, "bob"))
    env.work()
    with env.runtime.store.session() as s:
        change = s.scalar(select(MergedChange))
        assert change.by_bot is False and change.author == "bob"
        assert (
            change.issue_title == "Need title()" and change.issue_body == "Title-case helper please"
        )
        assert "+def title(text):" in change.diff
        assert s.scalar(select(func.count()).select_from(ReviewSignal)) == 0


def test_github_5xx_and_secondary_rate_limit_are_retried(env):
    env.fake.fail_next(
        "GET",
        r"/collaborators/alice/permission$",
        403,
        {"Retry-After": "1"},
        "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
    )
    env.fake.fail_next("POST", r"/repos/acme/widgets/pulls$", 502, message="Bad Gateway")
    issue, number = open_pr(env)
    statuses = [
        (m, p, st) for m, p, st in env.fake.log if "/permission" in p or p.endswith("/pulls")
    ]
    assert [st for m, p, st in statuses if "/permission" in p][:2] == [403, 200]
    assert [st for m, p, st in statuses if m == "POST"] == [502, 201]
    with env.runtime.store.session() as s:
        assert s.scalar(select(Job.state)) == "succeeded"


def test_when_github_keeps_failing_the_issue_is_told(env):
    env.fake.fail_next("POST", r"/repos/acme/widgets/pulls$", 502, message="Bad Gateway", times=10)
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    env.deliver("issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"))
    env.work()
    assert env.repo.pulls == {}
    status = bot_comments(env, issue)
    assert len(status) == 1
    assert "could not finish" in status[0]["body"] and "GitHub answered 502" in status[0]["body"]


def test_a_pull_request_closed_before_its_revision_ran_drops_it_with_a_message(env):
    issue, number = open_pr(env)
    head = env.fake.branch_sha(env.repo, env.repo.pulls[number]["head"])
    review_id, (cid,) = env.fake.add_review(
        env.repo, number, "alice", "CHANGES_REQUESTED", "", comments=[("textutil.py", 3, "No.")]
    )
    env.deliver("pull_request_review", env.fake.review_submitted(env.repo, number, review_id))
    env.fake.close_pull(env.repo, number)
    env.deliver("pull_request", env.fake.pull_closed(env.repo, number, "alice"))
    env.work()  # review → revision queued; closed → revision cancelled; the job is skipped
    assert env.fake.branch_sha(env.repo, env.repo.pulls[number]["head"]) == head
    with env.runtime.store.session() as s:
        job = s.scalar(select(Job).where(Job.kind == "revise"))
        assert job.state == "cancelled"
        pr = s.scalar(select(PullRequest))
        assert pr.state == "closed"
        assert [sig.kind for sig in pr.signals] == [
            "changes_requested",
            "line_comment",
            "closed_unmerged",
        ]
    status = bot_comments(env, number)
    assert len(status) == 1 and "was closed, so this revision was dropped" in status[0]["body"]
    reply = [c for c in env.repo.review_comments.values() if c["in_reply_to"] == cid]
    assert len(reply) == 1 and "could not revise" in reply[0]["body"]


def test_when_github_fails_before_the_job_starts_the_issue_is_told(env):
    env.fake.fail_next(
        "GET", r"/collaborators/alice/permission$", 502, message="Bad Gateway", times=5
    )  # the first try and every retry
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    env.deliver("issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"))
    env.work()
    comments = bot_comments(env, issue)
    assert len(comments) == 1 and "gave up" in comments[0]["body"]
    assert "GitHub answered 502" in comments[0]["body"]
    with env.runtime.store.session() as s:
        assert s.scalar(select(Delivery.state)) == "failed"
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_a_second_label_while_the_first_job_waits_opens_nothing_more(env):
    issue = env.fake.open_issue(env.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
    env.deliver("issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"), "d-a")
    env.deliver("issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"), "d-b")
    env.work()
    assert len(env.repo.pulls) == 1
    with env.runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Request)) == 1
        notes = dict(s.execute(select(Delivery.delivery_id, Delivery.note)).all())
    assert notes["d-a"] is None and "already queued or running" in notes["d-b"]


def test_the_trigger_label_comes_from_codeloop_yml_on_the_default_branch(tmp_path):
    files = {**FILES, ".codeloop.yml": "test_command: python -m pytest -q\ntrigger_label: ai\n"}
    e = make_env(tmp_path, ScriptedBackend(GOOD), files=files)
    try:
        issue = e.fake.open_issue(e.repo, ISSUE_TITLE, ISSUE_BODY, "alice")
        e.deliver("issues", e.fake.issue_labeled(e.repo, issue, "codeloop", "alice"))
        e.work()
        with e.runtime.store.session() as s:
            assert "not the trigger label 'ai'" in s.scalar(select(Delivery.note))
            assert s.scalar(select(func.count()).select_from(Job)) == 0
        # A broken .codeloop.yml on the default branch: the labeller is told why.
        work = tmp_path / "edit"
        subprocess.run(["git", "clone", "-q", str(e.repo.path), str(work)], check=True)
        (work / ".codeloop.yml").write_text("trigger_label: [ai\n")
        subprocess.run(["git", "-C", str(work), "-c", "user.name=a", "-c", "user.email=a@x",
                        "commit", "-qam", "break config"], check=True)
        subprocess.run(["git", "-C", str(work), "push", "-q", "origin", "main"], check=True)
        e.deliver("issues", e.fake.issue_labeled(e.repo, issue, "ai", "alice"))
        e.work()
        told = bot_comments(e, issue)
        assert len(told) == 1 and "not valid YAML" in told[0]["body"]
    finally:
        e.close()


class GatedBackend(ScriptedBackend):
    """Scripted answers; once armed, the next generation waits until the test releases it."""

    def __init__(self, *answers: str):
        super().__init__(*answers)
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, messages, params, on_text=None):
        if self.armed.is_set():
            self.entered.set()
            assert self.release.wait(60)
        return super().generate(messages, params, on_text)


def test_a_pull_request_closed_while_its_revision_runs_ends_the_job_cleanly(tmp_path):
    backend = GatedBackend(GOOD, REVISED)
    env = make_env(tmp_path, backend, files=FILES)
    try:
        issue, number = open_pr(env)
        branch = env.repo.pulls[number]["head"]
        head = env.fake.branch_sha(env.repo, branch)
        review_id, (cid,) = env.fake.add_review(
            env.repo, number, "alice", "CHANGES_REQUESTED", "", comments=[("textutil.py", 3, "x")]
        )
        env.deliver("pull_request_review", env.fake.review_submitted(env.repo, number, review_id))
        backend.armed.set()
        worker = threading.Thread(target=env.work)  # handles the review, then runs the revision
        worker.start()
        assert backend.entered.wait(60)  # the revision is generating now
        env.fake.close_pull(env.repo, number)
        env.deliver("pull_request", env.fake.pull_closed(env.repo, number, "alice"))
        env.handle_next_delivery()  # the deliveries consumer handles the close meanwhile
        backend.release.set()
        worker.join(120)
        env.work()
        with env.runtime.store.session() as s:
            assert s.scalar(select(Job.state).where(Job.kind == "revise")) == "cancelled"
            assert s.scalar(select(PullRequest.state)) == "closed"
        assert env.fake.branch_sha(env.repo, branch) == head  # nothing pushed
        status = bot_comments(env, number)
        assert len(status) == 1 and "was closed, so this revision was dropped" in status[0]["body"]
        replies = [c for c in env.repo.review_comments.values() if c["in_reply_to"] == cid]
        assert len(replies) == 1 and "could not revise" in replies[0]["body"]
    finally:
        env.close()
