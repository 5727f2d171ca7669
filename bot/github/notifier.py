"""Progress on GitHub: one status comment per job, edited in place as the stages pass.

A job that creates a pull request reports on its issue; a revision reports on the pull
request and, when it ends, replies to each review comment it addressed. Texts are built by
the pure `render_*` functions; the notifier only sends them (docs/architecture.md).
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from bot import verdict
from bot.forges.github_auth import GitHubClients
from bot.store.db import Store
from bot.store.models import (
    GitHubReviewReply,
    GitHubStatusComment,
    Job,
    PullRequest,
    utcnow,
)

log = logging.getLogger(__name__)

STEPS = ["queued", "reading the repository", "generating", "validating", "opening the pull request"]
REVISION_STEPS = [
    "queued",
    "reading the pull request",
    "generating",
    "validating",
    "pushing the revision",
]


def step_index(stage: str) -> int:
    if stage == "queued":
        return 0
    if stage in ("workspace", "context", "prompt"):
        return 1
    if stage.startswith("generate"):
        return 2
    if stage.startswith("validate"):
        return 3
    if stage == "publish":
        return 4
    return 1


def render_status(job_id: int, kind: str, stage: str, detail: str = "") -> str:
    steps = REVISION_STEPS if kind == "revise" else STEPS
    current = step_index(stage)
    what = "revising this pull request" if kind == "revise" else "working on this issue"
    lines = [f"**codeloop** is {what} (job {job_id}).", ""]
    for i, step in enumerate(steps):
        if i < current:
            lines.append(f"- [x] {step}")
        elif i == current:
            lines.append(f"- [ ] **{detail or step}** …")
        else:
            lines.append(f"- [ ] {step}")
    return "\n".join(lines)


def render_finished(job_id: int, kind: str, ok: bool, text: str, result: dict) -> str:
    steps = REVISION_STEPS if kind == "revise" else STEPS
    if not ok:
        retry = (
            "Request changes again (or mention codeloop on this pull request) to retry."
            if kind == "revise"
            else "Edit the issue and add the label again (or mention codeloop) to retry."
        )
        return (f"**codeloop** could not finish job {job_id}.\n\n{verdict.code_block(text)}"
                f"\n\n{retry}")
    lines = [f"**codeloop** finished job {job_id}.", ""]
    lines.extend(f"- [x] {step}" for step in steps)
    validation = result.get("validation") or {}
    if validation:
        lines += ["", f"Validation: {verdict.line(validation)}."]
    url = result.get("url") or ""
    if kind == "revise":
        lines += [
            "",
            f"Pushed {str(result.get('commit', ''))[:10]} to `{result.get('branch')}`: {url}",
        ]
    else:
        lines += ["", f"Pull request: {url}"]
    return "\n".join(lines)


def render_reply(path: str | None, ok: bool, text: str, result: dict) -> str:
    """What a revision says on one review comment: what was done, or why not."""
    if not ok:
        return f"I could not revise this pull request: {text}"
    commit = str(result.get("commit", ""))[:10]
    changed = result.get("changed") or []
    if path and path in changed:
        return (
            f"Addressed in {commit}: `{path}` was changed in this revision "
            f"(validation: {verdict.line(result.get('validation') or {})})."
        )
    others = ", ".join(f"`{p}`" for p in changed) or "no file"
    where = f"`{path}`" if path else "this file"
    return (
        f"Not changed in {commit}: this revision did not touch {where} (it changed "
        f"{others}). Reply here or request changes again if this still applies."
    )


class GitHubNotifier:
    def __init__(self, store: Store, clients: GitHubClients):
        self.store = store
        self.clients = clients

    # ------------------------------------------------------------ where the comment goes

    def _where(self, job_id: int) -> tuple[str, int, str, int | None]:
        """(repo, issue or PR number, job kind, existing status comment id)."""
        with self.store.session() as s:
            job = s.get(Job, job_id)
            row = s.get(GitHubStatusComment, job_id)
            if row is not None:
                return row.repo, row.number, job.kind, row.comment_id
            reply_to = dict(job.request.reply_to or {})
            repo = reply_to.get("repo") or job.request.repo
            if job.kind == "revise" and job.pull_request_id is not None:
                number = s.get(PullRequest, job.pull_request_id).number
            else:
                number = reply_to.get("issue")
            return repo, int(number), job.kind, None

    def _write(self, job_id: int, text: str) -> None:
        """Create the status comment, or edit it: one API call either way."""
        repo, number, _, comment_id = self._where(job_id)
        requester = self.clients.for_repo(repo).requester
        if comment_id is not None:
            requester.requestJsonAndCheck(
                "PATCH", f"/repos/{repo}/issues/comments/{comment_id}", input={"body": text}
            )
            return
        _, data = requester.requestJsonAndCheck(
            "POST", f"/repos/{repo}/issues/{number}/comments", input={"body": text}
        )
        with self.store.session() as s:
            s.add(
                GitHubStatusComment(job_id=job_id, repo=repo, number=number, comment_id=data["id"])
            )

    def queued(self, job_id: int) -> None:
        _, _, kind, _ = self._where(job_id)
        self._write(job_id, render_status(job_id, kind, "queued"))

    # ------------------------------------------------------------ Notifier

    def stage(self, job_id: int, stage: str, detail: str = "") -> None:
        _, _, kind, _ = self._where(job_id)
        self._write(job_id, render_status(job_id, kind, stage, detail))

    def finished(self, job_id: int, text: str, ok: bool) -> None:
        repo, number, kind, _ = self._where(job_id)
        with self.store.session() as s:
            job = s.get(Job, job_id)
            result = dict(job.result or {})
            pr = s.get(PullRequest, job.pull_request_id) if job.pull_request_id else None
            if kind == "revise" and not ok and text == "cancelled" and pr and pr.state != "open":
                # The pull request was closed while this revision ran: say that, not "cancelled".
                text = f"the pull request was {pr.state}, so this revision was dropped."
        self._write(job_id, render_finished(job_id, kind, ok, text, result))
        if kind == "revise":
            self._reply_to_review_comments(job_id, repo, ok, text, result)
            if ok:
                self._update_pr_body(job_id, repo)

    def _reply_to_review_comments(
        self, job_id: int, repo: str, ok: bool, text: str, result: dict
    ) -> None:
        with self.store.session() as s:
            rows = s.scalars(
                select(GitHubReviewReply)
                .where(GitHubReviewReply.job_id == job_id, GitHubReviewReply.reply_id.is_(None))
                .order_by(GitHubReviewReply.id)
            ).all()
            todo = [(r.id, r.comment_id, r.path) for r in rows]
            number = s.get(PullRequest, rows[0].pull_request_id).number if rows else None
        if not todo:
            return
        pull = self.clients.for_repo(repo).get_repo(repo).get_pull(number)
        for row_id, comment_id, path in todo:
            reply = pull.create_review_comment_reply(
                comment_id, render_reply(path, ok, text, result)
            )
            with self.store.session() as s:
                row = s.get(GitHubReviewReply, row_id)
                row.reply_id, row.replied_at = reply.id, utcnow()

    def _update_pr_body(self, job_id: int, repo: str) -> None:
        with self.store.session() as s:
            pr = s.get(PullRequest, s.get(Job, job_id).pull_request_id)
            number, body = pr.number, pr.body
        self.clients.for_repo(repo).get_repo(repo).get_pull(number).edit(body=body)
