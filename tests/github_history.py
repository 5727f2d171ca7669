"""A GitHub-hosted repository with a history to learn from, made through the local GitHub
server and codeloop's real webhook handling (signed deliveries, the real huey queue):

- A: codeloop's pull request, changes requested, revised, approved, merged;
- B: codeloop's pull request, closed, reopened, then merged;
- C: a person's pull request into the default branch (linked issue), merged;
- D: a person's pull request into `release` (not the default branch), merged.

Each merge has a GitHub `merged_at` a day or more after the test runs (after the
revisions, as in life), so it cannot be mistaken for the time codeloop processed the
delivery. The model's answers are scripted (a fake at the Backend port).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bot.demo import SAMPLE_FILES
from tests.fakes import ScriptedBackend
from tests.github_harness import GitHubEnv, make_env

HELPERS = SAMPLE_FILES["textutil.py"]
ANSWER_A = (
    f"textutil.py\n```python\n{HELPERS}\n\ndef whisper(text):\n"
    '    return text.lower() + "..."\n```\n'
)
REVISED_A = (
    f"textutil.py\n```python\n{HELPERS}\n\ndef whisper(text):\n"
    '    """Lower-case text trailing off."""\n    return text.lower() + "..."\n```\n'
)
ANSWER_B = (
    'textstats.py\n```python\n"""Counting helpers."""\n\n\ndef count_words(text):\n'
    '    """How many words the text has."""\n    return len(text.split())\n```\n'
)
NAMES = (
    '"""Name helpers."""\n\n\ndef initials(name):\n'
    '    return "".join(w[0] for w in name.split())\n'
)
RELEASE = '"""Release notes."""\n\nVERSION = "1.0.1"\n'
FILES = {**SAMPLE_FILES, ".codeloop.yml": "test_command: python -m pytest -q\n"}


def backend() -> ScriptedBackend:
    # Calls in order: A (create), B (create), A (revision).
    return ScriptedBackend(ANSWER_A, ANSWER_B, REVISED_A)


@dataclass
class History:
    env: GitHubEnv
    a: int
    b: int
    c: int
    d: int
    merged_at: dict[int, datetime]  # GitHub's merged_at (naive UTC) per pull request number
    work: Path  # a clone of the repository, for pushing more


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=Bob", "-c", "user.email=bob@example.com", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout


def bot_pr(env: GitHubEnv, title: str, body: str, delivery: str) -> int:
    before = set(env.repo.pulls)
    issue = env.fake.open_issue(env.repo, title, body, "alice")
    reply = env.deliver(
        "issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"), delivery
    )
    assert reply.status_code == 202, reply.text
    env.work()
    new = set(env.repo.pulls) - before
    assert len(new) == 1, env.fake.comments_on(env.repo, issue)
    return new.pop()


def person_pr(env: GitHubEnv, work: Path, branch: str, base: str, path: str, text: str,
              title: str, body: str) -> int:
    git(work, "fetch", "-q", "origin")
    git(work, "checkout", "-q", "-B", branch, f"origin/{base}")
    (work / path).write_text(text)
    git(work, "add", path)
    git(work, "commit", "-qm", title)
    git(work, "push", "-q", "origin", f"{branch}:{branch}")
    return env.fake.open_pull(env.repo, branch, base, title, body, "bob")


def merge(env: GitHubEnv, number: int, when: datetime, sender: str = "alice") -> None:
    env.fake.merge_pull(env.repo, number, merged_at=when)
    reply = env.deliver("pull_request", env.fake.pull_closed(env.repo, number, sender))
    assert reply.status_code == 202, reply.text
    env.work()


def make_github_history(tmp_path: Path, db_url: str | None = None, **env_kwargs) -> History:
    base_time = (datetime.now(timezone.utc) + timedelta(days=1)).replace(microsecond=0)
    env = make_env(tmp_path, backend(), db_url=db_url, files=FILES, **env_kwargs)
    env.repo.permissions["bob"] = "write"
    work = tmp_path / "bob"
    subprocess.run(["git", "clone", "-q", str(env.repo.path), str(work)], check=True)
    git(work, "push", "-q", "origin", "main:release")  # a maintenance branch

    a = bot_pr(env, "Add a whisper(text) helper",
               "whisper(text) returns the text in lower case followed by '...'.", "d-a")
    b = bot_pr(env, "Add count_words(text) in textstats.py",
               "A new module textstats.py with count_words(text): how many words.", "d-b")
    # A: changes requested → a revision → approved → merged.
    review, _ = env.fake.add_review(env.repo, a, "alice", "CHANGES_REQUESTED",
                                    "Give whisper a docstring.")
    env.deliver("pull_request_review", env.fake.review_submitted(env.repo, a, review))
    env.work()
    approve, _ = env.fake.add_review(env.repo, a, "alice", "APPROVED", "LGTM")
    env.deliver("pull_request_review", env.fake.review_submitted(env.repo, a, approve))
    env.work()
    when = {a: base_time, b: base_time + timedelta(days=2)}
    merge(env, a, when[a])
    # B: closed without merging, reopened, merged.
    env.fake.close_pull(env.repo, b)
    env.deliver("pull_request", env.fake.pull_closed(env.repo, b, "alice"))
    env.work()
    env.fake.reopen_pull(env.repo, b)
    env.deliver("pull_request", env.fake.pull_reopened(env.repo, b, "alice"))
    env.work()
    merge(env, b, when[b])
    # C: a person's pull request into main, for an issue.
    issue = env.fake.open_issue(env.repo, "Need initials(name)",
                                "initials('Ada Lovelace') should be 'AL'.", "bob")
    c = person_pr(env, work, "initials", "main", "names.py", NAMES, "Add names.initials",
                  f"Fixes #{issue}")
    when[c] = base_time + timedelta(days=4)
    merge(env, c, when[c], sender="bob")
    # D: a person's pull request into `release`, not the default branch.
    d = person_pr(env, work, "notes", "release", "release.py", RELEASE, "Release 1.0.1",
                  "Version bump on the maintenance branch.")
    when[d] = base_time + timedelta(days=5)
    merge(env, d, when[d], sender="bob")
    naive = {n: t.astimezone(timezone.utc).replace(tzinfo=None) for n, t in when.items()}
    return History(env, a, b, c, d, naive, work)
