"""Comments on codeloop's pull requests: each is a review signal; one that mentions
codeloop (in the conversation, or on a line of the diff) asks for a revision."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.deliveries import DeliveryView, Ignored
from bot.github import events
from bot.github.handlers import reviews
from feedback.signals import record_signal

if TYPE_CHECKING:
    from bot.github.handler import GitHubHandler


def on_pull_request(h: GitHubHandler, ev: events.Trigger, view: DeliveryView) -> int | None:
    """`issue_comment.created` on a pull request (the trigger's checks have passed)."""
    pr_id, request_id, state = h.require_bot_pr(ev.repo, ev.number, "a comment on a pull request")
    if ev.label is not None:
        raise Ignored("a label on a pull request")
    record_signal(
        h.store,
        pr_id,
        kind="commented",
        source="github",
        external_id=f"issue-comment-{ev.comment_id}",
        body=ev.comment_body,
        author=ev.sender,
    )
    remote = h.revisable(ev.repo, ev.number, state, ev.sender)
    remote.get_issue(ev.number).get_comment(ev.comment_id).create_reaction("eyes")
    reviews.revise(
        h,
        remote,
        ev.number,
        pr_id,
        request_id,
        reviewer=ev.sender,
        summary=h.without_mention(ev.comment_body),
        key=f"revise:github:comment-{ev.comment_id}",
    )
    return request_id


def review_comment(
    h: GitHubHandler, ev: events.ReviewCommentCreated, view: DeliveryView
) -> int | None:
    """`pull_request_review_comment.created`: a line comment, or a reply in its thread."""
    pr_id, request_id, state = h.require_bot_pr(
        ev.repo, ev.pr_number, "a review comment on a pull request"
    )
    if ev.author_is_bot or h.is_self(ev.author):
        raise Ignored("a review comment by a bot (or by codeloop itself)")
    asks = events.mentions(ev.body, h.settings.github.bot_name)
    if ev.in_reply_to is not None:  # a reply inside a review thread: talk, not a new comment
        if not asks:
            raise Ignored("a reply inside a review thread (not a line comment)")
    else:
        reviews.line_signal(
            h.store, pr_id, comment_id=ev.comment_id, body=ev.body, author=ev.author,
            path=ev.path, line=ev.line,
        )
    if not asks:
        return request_id
    # `@codeloop` on a line of the diff asks for a revision, as in a review body.
    remote = h.revisable(ev.repo, ev.pr_number, state, ev.author, "; nothing to revise")
    text = h.without_mention(ev.body)
    where = f"{ev.path} line {ev.line}" if ev.line else (ev.path or "the diff")
    # A comment inside a review shares the review's key: the review and its comments,
    # delivered separately, make one revision.
    key = (
        f"revise:github:review-{ev.review_id}"
        if ev.review_id is not None and ev.in_reply_to is None
        else f"revise:github:review-comment-{ev.comment_id}"
    )
    reviews.revise(
        h,
        remote,
        ev.pr_number,
        pr_id,
        request_id,
        reviewer=ev.author,
        summary=f"On {where}: {text}" if ev.in_reply_to is not None else "",
        key=key,
    )
    return request_id
