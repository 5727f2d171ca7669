"""Reviews of codeloop's pull requests: each is a review signal; changes requested (or a
review that mentions codeloop) start one revision for every open line comment."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot import jobs
from bot.deliveries import DeliveryView, Ignored
from bot.github import events
from bot.store.models import GitHubReviewReply
from feedback.signals import dismiss_signal, record_signal

if TYPE_CHECKING:
    from bot.github.handler import GitHubHandler
    from bot.store.db import Store


def compose_feedback(review_body: str, reviewer: str, comments: list[dict]) -> str:
    """The review as the model reads it: the summary, then every open line comment."""
    lines = []
    if review_body.strip():
        lines.append(f"Review by {reviewer}: {review_body.strip()}")
    if comments:
        lines.append("Line comments to address (all of them, in one change):")
        for c in comments:
            where = f"{c['path']} line {c['line']}" if c.get("line") else (c.get("path") or "")
            lines.append(f"- {where}: {c['body'].strip()}")
    return "\n".join(lines) or "Revise the change."


def submitted(h: GitHubHandler, ev: events.ReviewSubmitted, view: DeliveryView) -> int | None:
    if ev.author_is_bot or h.is_self(ev.author):
        raise Ignored("a review by a bot (or by codeloop itself)")
    pr_id, request_id, state = h.require_bot_pr(ev.repo, ev.pr_number, "a review of a pull request")
    record_signal(
        h.store,
        pr_id,
        kind=ev.state,
        source="github",
        external_id=f"review-{ev.review_id}",
        body=ev.body or None,
        author=ev.author,
    )
    wants = ev.state == "changes_requested" or events.mentions(
        ev.body, h.settings.github.bot_name
    )
    if not wants:
        return request_id
    remote = h.revisable(ev.repo, ev.pr_number, state, ev.author, "; nothing to revise")
    revise(
        h,
        remote,
        ev.pr_number,
        pr_id,
        request_id,
        reviewer=ev.author,
        summary=ev.body,
        key=f"revise:github:review-{ev.review_id}",
    )
    return request_id


def dismissed(h: GitHubHandler, ev: events.ReviewDismissed, view: DeliveryView) -> int | None:
    found = h.require_bot_pr(ev.repo, ev.pr_number, "a dismissed review of a pull request")
    before = dismiss_signal(h.store, source="github", external_id=f"review-{ev.review_id}")
    if before is None:
        raise Ignored(f"review {ev.review_id} was never stored")
    return found[1]


def line_signal(store: Store, pr_id: int, *, comment_id: int, body: str, author: str | None,
                path: str | None, line: int | None) -> None:
    """A comment on a line of the diff, stored as a review signal."""
    record_signal(
        store,
        pr_id,
        kind="line_comment",
        source="github",
        external_id=f"review-comment-{comment_id}",
        body=body,
        author=author,
        path=path,
        line=line,
    )


def revise(
    h: GitHubHandler,
    remote,
    number: int,
    pr_id: int,
    request_id: int,
    *,
    reviewer: str,
    summary: str,
    key: str,
) -> None:
    """One revision job for every review comment nobody (not the bot) has answered yet."""
    pull = remote.get_pull(number)
    all_comments = list(pull.get_review_comments())
    mine = {c.id for c in all_comments if c.user is not None and h.is_self(c.user.login)}
    answered = {c.in_reply_to_id for c in all_comments if c.id in mine and c.in_reply_to_id}
    open_comments = [
        {
            "id": c.id,
            "path": c.path,
            "line": c.line or c.original_line,
            "body": c.body or "",
            "author": c.user.login if c.user else None,
        }
        for c in all_comments
        if not c.in_reply_to_id and c.id not in answered and c.id not in mine
    ]
    for c in open_comments:
        line_signal(h.store, pr_id, comment_id=c["id"], body=c["body"], author=c["author"],
                    path=c["path"], line=c["line"])
    feedback = compose_feedback(summary or "", reviewer, open_comments)
    job_id, created = jobs.submit_revision(
        h.store, request_id=request_id, pull_request_id=pr_id, feedback=feedback, key=key
    )
    if not created:
        return
    with h.store.session() as s:
        for c in open_comments:
            s.add(
                GitHubReviewReply(
                    job_id=job_id,
                    pull_request_id=pr_id,
                    comment_id=c["id"],
                    path=c["path"],
                    line=c["line"],
                    body=c["body"],
                    author=c["author"],
                )
            )
    h.start(job_id)
