"""Pull requests reopened, closed or merged: codeloop's become outcomes (review signals,
dropped revisions); every merge is stored as training material (`MergedChange`)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from sqlalchemy import select

from bot import jobs
from bot.deliveries import DeliveryView, Ignored
from bot.forges.github import describe
from bot.github import events
from bot.store.db import insert_or_get
from bot.store.models import Job, MergedChange, PullRequest, utcnow
from feedback.signals import record_signal

if TYPE_CHECKING:
    from bot.github.handler import GitHubHandler

log = logging.getLogger(__name__)

CLOSES = re.compile(r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s+#(\d+)\b", re.IGNORECASE)


def linked_issue(body: str | None) -> int | None:
    m = CLOSES.search(body or "")
    return int(m[1]) if m else None


def reopened(h: GitHubHandler, ev: events.PullRequestReopened, view: DeliveryView) -> int | None:
    found = h.bot_pr(ev.repo, ev.number)
    if found is None:
        raise Ignored("a pull request codeloop did not open was reopened")
    pr_id, request_id, _ = found
    with h.store.session() as s:
        pr = s.get(PullRequest, pr_id)
        if pr.state == "closed":
            pr.state = "open"
    return request_id


def closed(h: GitHubHandler, ev: events.PullRequestClosed, view: DeliveryView) -> int | None:
    found = h.bot_pr(ev.repo, ev.number)
    stored_merge = False
    # Every merge is stored with the branch it went into; which branches are training
    # material is the dataset's decision (`.codeloop.yml` `training_branches`).
    if ev.merged and _keeps_merged(h, ev.repo):
        stored_merge = _store_merged(h, ev, found[0] if found else None)
    if found is None:
        if stored_merge:
            return None
        raise Ignored("a pull request codeloop did not open was closed")
    pr_id, request_id, _ = found
    with h.store.session() as s:
        pr = s.get(PullRequest, pr_id)
        if ev.merged:  # a merge is final, whatever happened before (close, reopen)
            pr.state = "merged"
            pr.merged_at = _when(ev.merged_at) or pr.merged_at or utcnow()
        elif pr.state == "open":
            pr.state = "closed"
        pending = s.scalars(
            select(Job.id).where(
                Job.pull_request_id == pr_id, Job.state.in_(("queued", "running"))
            )
        ).all()
    for job_id in pending:  # a revision of a closed pull request ends cleanly
        if jobs.cancel(h.store, job_id):
            why = "merged" if ev.merged else "closed"
            try:
                h.notifier.finished(
                    job_id,
                    f"the pull request was {why}, so this revision was dropped.",
                    ok=False,
                )
            except Exception:  # noqa: BLE001 - the outcome is stored either way
                log.exception("job %s: could not say that the revision was dropped", job_id)
    # Each outcome has its own id: a merge after a close and reopen is a second signal,
    # not a redelivery of the first; each close is told apart by its time.
    external_id = (
        f"merged-{ev.repo}#{ev.number}"
        if ev.merged
        else f"closed-{ev.repo}#{ev.number}@{ev.closed_at or ''}"
    )
    record_signal(
        h.store,
        pr_id,
        kind="merged" if ev.merged else "closed_unmerged",
        source="github",
        external_id=external_id[:200],
        author=ev.sender or None,
    )
    return request_id


def _keeps_merged(h: GitHubHandler, repo: str) -> bool:
    wanted = h.settings.github.merged_repos
    return not wanted or repo in wanted


def _store_merged(h: GitHubHandler, ev: events.PullRequestClosed, pr_id: int | None) -> bool:
    from github import GithubException

    with h.store.session() as s:
        exists = s.scalar(
            select(MergedChange.id).where(
                MergedChange.forge == "github",
                MergedChange.repo == ev.repo,
                MergedChange.external_id == str(ev.number),
            )
        )
    if exists is not None:
        return True
    remote = h.remote(ev.repo)
    diff = "".join(_file_diff(f) for f in remote.get_pull(ev.number).get_files())
    issue_no = linked_issue(ev.body)
    issue_title = issue_body = None
    if issue_no is not None:
        try:
            issue = remote.get_issue(issue_no)
            issue_title, issue_body = issue.title, issue.body
        except GithubException as exc:
            log.info(
                "%s#%s: linked issue #%s not read: %s",
                ev.repo,
                ev.number,
                issue_no,
                describe(exc),
            )
    values = {
        "forge": "github",
        "repo": ev.repo,
        "external_id": str(ev.number),
        "title": ev.title,
        "body": ev.body,
        "issue_number": issue_no,
        "issue_title": issue_title,
        "issue_body": issue_body,
        "diff": diff,
        "base_sha": ev.base_sha,
        "base_ref": ev.base_ref or None,
        "merge_sha": ev.merge_sha,
        "author": ev.author or None,
        "by_bot": pr_id is not None,
        "pull_request_id": pr_id,
        **({"merged_at": _when(ev.merged_at)} if _when(ev.merged_at) else {}),
    }
    with h.store.session() as s:  # once: a concurrent redelivery may have stored it
        insert_or_get(s, MergedChange, values, key=("forge", "repo", "external_id"))
    return True


def _when(text: str | None):
    """GitHub's ISO 8601 time (`2019-05-15T15:20:33Z`) as a naive UTC datetime, or None."""
    from datetime import datetime, timezone

    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def _file_diff(f) -> str:
    old = "/dev/null" if f.status == "added" else f"a/{f.filename}"
    new = "/dev/null" if f.status == "removed" else f"b/{f.filename}"
    patch = f.patch or ""
    if patch and not patch.endswith("\n"):
        patch += "\n"
    return f"diff --git a/{f.filename} b/{f.filename}\n--- {old}\n+++ {new}\n{patch}"
