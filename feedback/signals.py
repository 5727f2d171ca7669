"""Review signals: how a pull request was received, stored the same way for every forge.

Each signal is linked to the pull request, the revision it judged (the newest at the time)
and the model version that wrote that revision. `(source, external_id)` is unique, so a
redelivered review is stored once.

Recording a signal starts no work: a review that asks for a revision comes back as a
`RevisionWanted` decision, and the edge that received the review (the CLI, the GitHub or
Slack handler) submits the revision job. The forge that merges is passed in.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from bot import git
from bot.store.db import Store, insert_or_get
from bot.store.models import MergedChange, PullRequest, ReviewSignal, utcnow

KINDS = {
    "approved", "changes_requested", "commented", "line_comment", "merged", "closed_unmerged",
    "dismissed",
}


class SignalError(ValueError):
    """The review cannot be recorded; the message is meant for the reviewer."""


@dataclass(frozen=True)
class RevisionWanted:
    """The review asks the bot to revise the pull request: the job the caller submits
    (`bot.jobs.submit_revision` takes these fields), once per `key`."""

    request_id: int
    pull_request_id: int
    feedback: str
    key: str


@dataclass(frozen=True)
class ReviewOutcome:
    signal_id: int
    created: bool
    revision: RevisionWanted | None  # set when the review asks the bot for a revision


@dataclass(frozen=True)
class _RepoRef:
    """The repository as a forge's `merge` reads it (the fields of bot.forges.RepoInfo)."""

    repo: str
    clone_url: str
    default_branch: str


def record_signal(
    store: Store, pr_id: int, *, kind: str, source: str, external_id: str,
    body: str | None = None, author: str | None = None, path: str | None = None,
    line: int | None = None,
) -> tuple[int, bool]:
    """Store one signal (once per external id); returns (signal id, created)."""
    if kind not in KINDS:
        raise SignalError(f"unknown review signal {kind!r}")
    with store.session() as s:
        pr = s.get(PullRequest, pr_id)
        if pr is None:
            raise SignalError(f"no pull request with id {pr_id}")
        latest = pr.revisions[-1] if pr.revisions else None
        return insert_or_get(s, ReviewSignal, {
            "pull_request_id": pr.id, "revision_id": latest.id if latest else None,
            "kind": kind, "body": body, "path": path, "line": line, "author": author,
            "model_version": latest.model_version if latest else pr.model_version,
            "source": source, "external_id": external_id,
        }, key=("source", "external_id"))


def dismiss_signal(store: Store, *, source: str, external_id: str) -> str | None:
    """A review was dismissed: its signal no longer judges the change (kind `dismissed`).

    Returns the kind it had, or None when no such review was stored."""
    with store.session() as s:
        signal = s.scalar(
            select(ReviewSignal).where(
                ReviewSignal.source == source, ReviewSignal.external_id == external_id
            )
        )
        if signal is None:
            return None
        before, signal.kind = signal.kind, "dismissed"
        return before


def _open_pr(s, pr_id: int, already: str = "is") -> PullRequest:
    """The pull request, which must still be open; otherwise a message for the reviewer."""
    pr = s.get(PullRequest, pr_id)
    if pr is None:
        raise SignalError(f"no pull request with id {pr_id}")
    if pr.state != "open":
        raise SignalError(f"pull request #{pr.number} {already} {pr.state}")
    return pr


def record_local_review(
    store: Store, pr_id: int, *, kind: str, body: str | None, author: str | None
) -> ReviewOutcome:
    """A review from `codeloop review`; changes requested ask for a revision (the caller
    submits it)."""
    with store.session() as s:
        request_id = _open_pr(s, pr_id).request_id
    if kind == "changes_requested" and not (body or "").strip():
        raise SignalError("say what to change: --request-changes \"COMMENT\"")
    external_id = f"local-{uuid.uuid4().hex}"
    signal_id, created = record_signal(
        store, pr_id, kind=kind, source="local", external_id=external_id, body=body, author=author
    )
    wanted = None
    if kind == "changes_requested":
        wanted = RevisionWanted(request_id=request_id, pull_request_id=pr_id,
                                feedback=body.strip(), key=f"revise:local:{signal_id}")
    return ReviewOutcome(signal_id=signal_id, created=created, revision=wanted)


def merge_local(store: Store, forge, pr_id: int, *, author: str | None) -> str:
    """Merge a local pull request with `forge` (the local forge) and record it: the merged
    change (training material) and the `merged` signal. Returns the merge commit."""
    with store.session() as s:
        pr = _open_pr(s, pr_id, "is already")
        repo = _RepoRef(repo=pr.repo, clone_url=pr.repo, default_branch=pr.base_branch)
        branch, base, title, number = pr.branch, pr.base_branch, pr.title, pr.number
    if not Path(repo.repo).exists():
        raise SignalError(f"the repository {repo.repo} no longer exists")
    sha = forge.merge(repo, branch=branch, base=base, message=f"Merge #{number}: {title}")
    top = Path(repo.repo)
    base_sha = git.rev(top, f"{sha}^1")
    diff = git.git(top, "diff", "--no-color", "--binary", base_sha, sha) if base_sha else ""
    with store.session() as s:
        pr = s.get(PullRequest, pr_id)
        pr.state, pr.merged_at = "merged", utcnow()
        # Training material (training/dataset.py), written the same way by every forge.
        s.add(MergedChange(
            forge="local", repo=pr.repo, external_id=str(number), title=pr.title, body=pr.body,
            diff=diff, base_sha=base_sha, merge_sha=sha, author=author, by_bot=True,
            pull_request_id=pr.id, merged_at=pr.merged_at,
        ))
    record_signal(store, pr_id, kind="merged", source="local", external_id=f"merge-{pr_id}",
                  author=author)
    return sha


def close_local(store: Store, pr_id: int, *, author: str | None) -> None:
    with store.session() as s:
        _open_pr(s, pr_id, "is already").state = "closed"
    record_signal(store, pr_id, kind="closed_unmerged", source="local",
                  external_id=f"close-{pr_id}", author=author)
