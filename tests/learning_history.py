"""A repository with a history codeloop learns from: people's commits (imported as merged
changes) and one bot pull request revised after review and merged with `merge_local`."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bot import jobs
from bot.forges.local import LocalForge
from bot.store.db import Store
from bot.store.models import PullRequest, Revision
from feedback.signals import merge_local, record_signal
from training.sources import import_git_history

BASE = '''"""Small text helpers."""


def slugify(text):
    """Lower-case words joined by dashes."""
    return "-".join(text.lower().split())
'''

# (commit message, function added to textutil.py)
PEOPLE = [
    ("Add shout(text): upper-case with an exclamation mark",
     'def shout(text):\n    """Upper-case text with an exclamation mark."""\n'
     '    return text.upper() + "!"\n'),
    ("Add count_words(text): how many words the text has",
     'def count_words(text):\n    """How many words."""\n    return len(text.split())\n'),
    ("Add reverse_words(text): the words in reverse order",
     'def reverse_words(text):\n    """Words in reverse order."""\n'
     '    return " ".join(reversed(text.split()))\n'),
    ("Add is_palindrome(text): true when the text reads the same backwards",
     'def is_palindrome(text):\n    """Same backwards."""\n'
     '    clean = text.lower().replace(" ", "")\n    return clean == clean[::-1]\n'),
    ("Add first_word(text): the first word or an empty string",
     'def first_word(text):\n    """The first word."""\n'
     '    words = text.split()\n    return words[0] if words else ""\n'),
]

BOT_REQUIREMENT = "Add a function last_word(text) to textutil.py that returns the last word."
BOT_FIRST = 'def last_word(text):\n    return text.split()[-1]\n'
BOT_FINAL = ('def last_word(text):\n    """The last word, or an empty string."""\n'
             '    words = text.split()\n    return words[-1] if words else ""\n')

ENV = ["-c", "user.name=Dev", "-c", "user.email=dev@example.com"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *ENV, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def append_function(repo: Path, body: str) -> None:
    path = repo / "textutil.py"
    path.write_text(path.read_text().rstrip("\n") + "\n\n\n" + body)


def make_history(root: Path, store: Store, people: int = len(PEOPLE), newest: int = 2) -> Path:
    """The repository at `root`, its history in `store`; returns the repository path.

    People's commits are dated in the past, except the last `newest`, dated after the bot's
    pull request (an hour from now): those are the newest changes a time split holds out."""
    repo = root / "textrepo"
    repo.mkdir(parents=True)
    (repo / "textutil.py").write_text(BASE)
    (repo / ".gitignore").write_text("__pycache__/\n")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "Initial commit")
    now = datetime.now(timezone.utc)
    for i, (message, body) in enumerate(PEOPLE[:people]):
        append_function(repo, body)
        git(repo, "add", "-A")
        newer = i >= people - newest
        when = now + timedelta(hours=1 + i) if newer else now - timedelta(days=30 - i)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S+0000")
        subprocess.run(["git", *ENV, "commit", "-q", "-m", message], cwd=repo, check=True,
                       env={"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp,
                            "PATH": "/usr/bin:/bin"})
    import_git_history(store, repo, repo=str(repo))
    add_bot_pr(repo, store)
    return repo


def add_bot_pr(repo: Path, store: Store) -> int:
    """A bot pull request: a first revision, changes requested, a second revision, merged."""
    sub = jobs.submit(store, source="cli", repo=str(repo), requirement=BOT_REQUIREMENT,
                      max_bytes=100_000)
    base = git(repo, "rev-parse", "HEAD")
    branch = "codeloop/last-word"
    git(repo, "checkout", "-q", "-b", branch)
    append_function(repo, BOT_FIRST)
    git(repo, "commit", "-q", "-am", BOT_REQUIREMENT)
    first = git(repo, "rev-parse", "HEAD")
    diff1 = git(repo, "diff", base, first) + "\n"
    with store.session() as s:
        pr = PullRequest(request_id=sub.request_id, forge="local", repo=str(repo), branch=branch,
                         base_branch="main", title="Add last_word", body="", model_version="base")
        s.add(pr)
        s.flush()
        pr.number = pr.id
        s.add(Revision(pull_request_id=pr.id, number=1, job_id=sub.job_id, commit_sha=first,
                       diff=diff1, diff_stat="", model_version="base", trigger="initial"))
        pr_id = pr.id
    feedback = "Handle an empty string: return '' instead of failing, and add a docstring."
    record_signal(store, pr_id, kind="changes_requested", source="local", external_id="rev-1",
                  body=feedback, author="maintainer")
    job2, _ = jobs.submit_revision(store, request_id=sub.request_id, pull_request_id=pr_id,
                                   feedback=feedback, key="revise:test")
    path = repo / "textutil.py"
    path.write_text(path.read_text().replace(BOT_FIRST, BOT_FINAL))
    git(repo, "commit", "-q", "-am", "Revise: address review feedback")
    second = git(repo, "rev-parse", "HEAD")
    diff2 = git(repo, "diff", first, second) + "\n"
    with store.session() as s:
        s.add(Revision(pull_request_id=pr_id, number=2, job_id=job2, commit_sha=second,
                       diff=diff2, diff_stat="", model_version="base", trigger="review"))
    record_signal(store, pr_id, kind="approved", source="local", external_id="rev-2",
                  author="maintainer")
    git(repo, "checkout", "-q", "main")
    merge_local(store, LocalForge(), pr_id, author="maintainer")
    return pr_id
