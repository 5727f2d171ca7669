"""A trigger on an issue (the trigger label, or a comment that mentions codeloop): a job.

A second trigger while the pull request is open revises it; a trigger while a job for the
issue is queued or running is refused with a word to the person who asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select

from bot import jobs
from bot.deliveries import DeliveryView, Ignored
from bot.github import events
from bot.github.handlers import comments
from bot.settings import RepoConfigError, parse_repo_config
from bot.store.models import Job, PullRequest, Request

if TYPE_CHECKING:
    from bot.github.handler import GitHubHandler


def trigger(h: GitHubHandler, ev: events.Trigger, view: DeliveryView) -> int | None:
    if ev.sender_is_bot or h.is_self(ev.sender):
        raise Ignored("an action by a bot (or by codeloop itself)")
    if ev.on_pull_request:
        return comments.on_pull_request(h, ev, view)
    if ev.issue_state != "open":
        raise Ignored(f"the issue is {ev.issue_state}")
    if ev.locked:
        raise Ignored("the issue is locked")
    remote = h.remote(ev.repo)
    if ev.label is not None:
        try:
            config = parse_repo_config(_read_config(remote))
        except RepoConfigError as exc:
            remote.get_issue(ev.number).create_comment(f"codeloop cannot start: {exc}")
            raise Ignored(str(exc)) from exc
        # GitHub's labels are case-insensitive ("Codeloop" is the label "codeloop").
        if ev.label.casefold() != config.trigger_label.casefold():
            raise Ignored(
                f"label {ev.label!r} is not the trigger label {config.trigger_label!r}"
            )

    h.require_write(remote, ev.number, ev.sender)
    issue = remote.get_issue(ev.number)
    running = _job_running_for_issue(h, ev.repo, ev.number)
    if running is not None:
        if ev.comment_id is not None:  # a person asked: say why nothing happens now
            issue.create_comment(
                f"@{ev.sender} codeloop is still working on job {running} for this issue, "
                "so this comment was not added to it. When the pull request is open, "
                "comment there (or request changes) to ask for a revision."
            )
        raise Ignored(f"a job for {ev.repo}#{ev.number} is already queued or running")
    if ev.comment_id is not None:
        issue.get_comment(ev.comment_id).create_reaction("eyes")
    else:
        issue.create_reaction("eyes")
    existing = _open_pr_for_issue(h, ev.repo, ev.number)
    if existing is not None:  # a second trigger updates the open pull request
        pr_id, request_id = existing
        feedback = (ev.comment_body or f"The issue now says:\n{ev.title}\n\n{ev.body}").strip()
        job_id, created = jobs.submit_revision(
            h.store,
            request_id=request_id,
            pull_request_id=pr_id,
            feedback=feedback,
            key=f"revise:github:{view.delivery_id}",
        )
        if created:
            h.start(job_id)
        return request_id

    requirement = f"{ev.title}\n\n{ev.body}".strip()
    if ev.comment_body and ev.comment_id is not None:
        extra = h.without_mention(ev.comment_body)
        if extra:
            requirement += f"\n\n{extra}"
    try:
        sub = jobs.submit(
            h.store,
            source="github",
            repo=ev.repo,
            requirement=requirement,
            max_bytes=h.settings.pipeline.max_requirement_bytes,
            requester=ev.sender,
            reply_to={
                "repo": ev.repo,
                "issue": ev.number,
                "comment": ev.comment_id,
                "installation": ev.installation_id,
            },
            delivery=f"github:{view.delivery_id}",
        )
    except jobs.BadRequest as exc:
        issue.create_comment(f"codeloop cannot start: {exc}")
        raise Ignored(str(exc)) from exc
    if sub.created:
        h.start(sub.job_id)
    return sub.request_id


def _read_config(remote) -> str | None:
    from github import UnknownObjectException

    try:
        content = remote.get_contents(".codeloop.yml", ref=remote.default_branch)
    except UnknownObjectException:
        return None
    return None if isinstance(content, list) else content.decoded_content.decode()


def _open_pr_for_issue(h: GitHubHandler, repo: str, issue: int) -> tuple[int, int] | None:
    with h.store.session() as s:
        rows = s.execute(
            select(PullRequest.id, PullRequest.request_id, Request.reply_to)
            .join(Request, Request.id == PullRequest.request_id)
            .where(
                PullRequest.forge == "github",
                PullRequest.repo == repo,
                PullRequest.state == "open",
                Request.source == "github",
            )
        ).all()
    for pr_id, request_id, reply_to in rows:
        if (reply_to or {}).get("issue") == issue:
            return pr_id, request_id
    return None


def _job_running_for_issue(h: GitHubHandler, repo: str, issue: int) -> int | None:
    """The id of a queued or running job for the issue, if there is one."""
    with h.store.session() as s:
        rows = s.execute(
            select(Job.id, Request.reply_to)
            .join(Job, Job.request_id == Request.id)
            .where(
                Request.source == "github",
                Request.repo == repo,
                Job.state.in_(("queued", "running")),
            )
        ).all()
    return next((job_id for job_id, reply_to in rows if (reply_to or {}).get("issue") == issue),
                None)
