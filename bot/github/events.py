"""GitHub webhook payloads parsed into typed values at the edge (docs/architecture.md).

`parse(event, payload)` returns one of the frozen dataclasses below, raises `Ignored` for a
delivery codeloop does not act on, and `MalformedPayload` (a ValueError) for a payload
that does not have the shape GitHub documents. It never raises anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bot.deliveries import Ignored

EVENTS = {
    "issues",
    "issue_comment",
    "pull_request",
    "pull_request_review",
    "pull_request_review_comment",
}


class MalformedPayload(ValueError):
    """The payload lacks a field GitHub always sends, or has it with the wrong type."""


@dataclass(frozen=True)
class Trigger:
    """`issues.labeled`, or `issue_comment.created` on an issue or pull request."""

    repo: str
    installation_id: int | None
    number: int
    title: str
    body: str
    sender: str
    sender_is_bot: bool
    on_pull_request: bool
    label: str | None = None  # issues.labeled
    comment_id: int | None = None  # issue_comment.created
    comment_body: str | None = None
    issue_state: str = "open"  # open | closed
    locked: bool = False


@dataclass(frozen=True)
class ReviewSubmitted:
    repo: str
    installation_id: int | None
    pr_number: int
    review_id: int
    state: str  # approved | changes_requested | commented
    body: str
    author: str
    author_is_bot: bool


@dataclass(frozen=True)
class ReviewDismissed:
    """`pull_request_review.dismissed`: the review no longer counts (its signal changes)."""

    repo: str
    installation_id: int | None
    pr_number: int
    review_id: int
    sender: str


@dataclass(frozen=True)
class PullRequestReopened:
    repo: str
    installation_id: int | None
    number: int
    sender: str


@dataclass(frozen=True)
class ReviewCommentCreated:
    repo: str
    installation_id: int | None
    pr_number: int
    comment_id: int
    review_id: int | None
    body: str
    author: str
    author_is_bot: bool
    path: str | None
    line: int | None
    in_reply_to: int | None


@dataclass(frozen=True)
class PullRequestClosed:
    repo: str
    installation_id: int | None
    number: int
    merged: bool
    title: str
    body: str
    author: str
    sender: str
    head_ref: str
    base_ref: str
    base_sha: str | None
    merge_sha: str | None
    merged_at: str | None = None  # ISO 8601, as GitHub sends it
    closed_at: str | None = None
    default_branch: str | None = None  # repository.default_branch


Event = (
    Trigger
    | ReviewSubmitted
    | ReviewDismissed
    | ReviewCommentCreated
    | PullRequestClosed
    | PullRequestReopened
)


# ---------------------------------------------------------------- field access


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            raise MalformedPayload(f"payload has no {'.'.join(path)}")
        data = data[key]
    return data


def _str(data: Any, *path: str, optional: bool = False) -> str:
    try:
        value = _get(data, *path)
    except MalformedPayload:
        if optional:
            return ""
        raise
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise MalformedPayload(f"{'.'.join(path)} is not a string")
    return value


def _int(data: Any, *path: str, optional: bool = False) -> int | None:
    try:
        value = _get(data, *path)
    except MalformedPayload:
        if optional:
            return None
        raise
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedPayload(f"{'.'.join(path)} is not an integer")
    return value


def _opt(data: Any, *path: str) -> Any:
    try:
        return _get(data, *path)
    except MalformedPayload:
        return None


def _is_bot(user: Any) -> bool:
    return isinstance(user, dict) and (
        user.get("type") == "Bot" or str(user.get("login", "")).endswith("[bot]")
    )


def _common(payload: Any) -> tuple[str, int | None, str]:
    if not isinstance(payload, dict):
        raise MalformedPayload("payload is not a JSON object")
    repo = _str(payload, "repository", "full_name")
    if repo.count("/") != 1:
        raise MalformedPayload(f"repository.full_name {repo!r} is not owner/name")
    installation = _int(payload, "installation", "id", optional=True)
    action = _str(payload, "action", optional=True)
    return repo, installation, action


def mentions(text: str | None, name: str) -> bool:
    """True when `text` addresses `@name` (not `@name-other`, not an e-mail address)."""
    if not text:
        return False
    return re.search(rf"(?<![\w@.-])@{re.escape(name)}(?![\w-])", text, re.IGNORECASE) is not None


# ---------------------------------------------------------------- parse


def _trigger(payload: Any, repo: str, installation: int | None, sender: str,
             sender_is_bot: bool, **what: Any) -> Trigger:
    """The issue (or pull request) of an `issues` or `issue_comment` delivery, and `what`
    happened to it (the label, or the comment)."""
    return Trigger(
        repo=repo,
        installation_id=installation,
        number=_int(payload, "issue", "number"),
        title=_str(payload, "issue", "title"),
        body=_str(payload, "issue", "body", optional=True),
        sender=sender,
        sender_is_bot=sender_is_bot,
        on_pull_request=_opt(payload, "issue", "pull_request") is not None,
        issue_state=_str(payload, "issue", "state", optional=True) or "open",
        locked=_opt(payload, "issue", "locked") is True,
        **what,
    )


def parse(event: str, payload: Any) -> Event:
    if event not in EVENTS:
        raise Ignored(f"codeloop does not act on {event!r} events")
    repo, installation, action = _common(payload)
    sender = _str(payload, "sender", "login", optional=True)
    sender_is_bot = _is_bot(payload.get("sender"))

    if event == "issues":
        if action != "labeled":
            raise Ignored(f"issues.{action} is not a trigger")
        return _trigger(
            payload, repo, installation, sender, sender_is_bot,
            label=_str(payload, "label", "name"),
        )
    if event == "issue_comment":
        if action != "created":
            raise Ignored(f"issue_comment.{action} is not a trigger")
        return _trigger(
            payload, repo, installation, sender,
            sender_is_bot or _is_bot(_opt(payload, "comment", "user")),
            comment_id=_int(payload, "comment", "id"),
            comment_body=_str(payload, "comment", "body", optional=True),
        )
    if event == "pull_request_review":
        if action == "dismissed":
            return ReviewDismissed(
                repo=repo,
                installation_id=installation,
                pr_number=_int(payload, "pull_request", "number"),
                review_id=_int(payload, "review", "id"),
                sender=sender,
            )
        if action != "submitted":
            raise Ignored(f"pull_request_review.{action} is not stored")
        state = _str(payload, "review", "state").lower()
        if state not in ("approved", "changes_requested", "commented"):
            raise Ignored(f"a review in state {state!r} is not stored")
        return ReviewSubmitted(
            repo=repo,
            installation_id=installation,
            pr_number=_int(payload, "pull_request", "number"),
            review_id=_int(payload, "review", "id"),
            state=state,
            body=_str(payload, "review", "body", optional=True),
            author=_str(payload, "review", "user", "login", optional=True) or sender,
            author_is_bot=_is_bot(_opt(payload, "review", "user")) or sender_is_bot,
        )
    if event == "pull_request_review_comment":
        if action != "created":
            raise Ignored(f"pull_request_review_comment.{action} is not stored")
        line = _int(payload, "comment", "line", optional=True)
        if line is None:
            line = _int(payload, "comment", "original_line", optional=True)
        return ReviewCommentCreated(
            repo=repo,
            installation_id=installation,
            pr_number=_int(payload, "pull_request", "number"),
            comment_id=_int(payload, "comment", "id"),
            review_id=_int(payload, "comment", "pull_request_review_id", optional=True),
            body=_str(payload, "comment", "body", optional=True),
            author=_str(payload, "comment", "user", "login", optional=True) or sender,
            author_is_bot=_is_bot(_opt(payload, "comment", "user")) or sender_is_bot,
            path=_str(payload, "comment", "path", optional=True) or None,
            line=line,
            in_reply_to=_int(payload, "comment", "in_reply_to_id", optional=True),
        )
    # pull_request
    if action == "reopened":
        return PullRequestReopened(
            repo=repo,
            installation_id=installation,
            number=_int(payload, "pull_request", "number"),
            sender=sender,
        )
    if action != "closed":
        raise Ignored(f"pull_request.{action} is not stored")
    merged = _get(payload, "pull_request", "merged")
    if not isinstance(merged, bool):
        raise MalformedPayload("pull_request.merged is not a boolean")
    return PullRequestClosed(
        repo=repo,
        installation_id=installation,
        number=_int(payload, "pull_request", "number"),
        merged=merged,
        title=_str(payload, "pull_request", "title"),
        body=_str(payload, "pull_request", "body", optional=True),
        author=_str(payload, "pull_request", "user", "login", optional=True),
        sender=sender,
        head_ref=_str(payload, "pull_request", "head", "ref"),
        base_ref=_str(payload, "pull_request", "base", "ref"),
        base_sha=_str(payload, "pull_request", "base", "sha", optional=True) or None,
        merge_sha=_str(payload, "pull_request", "merge_commit_sha", optional=True) or None,
        merged_at=_str(payload, "pull_request", "merged_at", optional=True) or None,
        closed_at=_str(payload, "pull_request", "closed_at", optional=True) or None,
        default_branch=_str(payload, "repository", "default_branch", optional=True) or None,
    )
