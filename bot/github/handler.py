"""The worker side of a GitHub delivery: decide, then act on GitHub and in the store.

Runs in a huey worker (`codeloop.handle_delivery` → `deliveries.handle` → here), never in
the web request. Triggers become jobs (for people with write permission), reviews become
review signals and revision jobs, closed pull requests become outcomes and, when merged,
training material (`MergedChange`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bot import jobs
from bot.deliveries import DeliveryView, Ignored
from bot.forges.github import describe
from bot.github import events
from bot.github.auth import GitHubClients
from bot.github.notifier import GitHubNotifier
from bot.settings import RepoConfigError, Settings, parse_repo_config
from bot.store.db import Store
from bot.store.models import (
    GitHubReviewReply,
    Job,
    MergedChange,
    PullRequest,
    Request,
    utcnow,
)
from feedback.signals import dismiss_signal, record_signal

log = logging.getLogger(__name__)

WRITE = {"admin", "maintain", "write"}
CLOSES = re.compile(r"\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s+#(\d+)\b", re.IGNORECASE)


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


def linked_issue(body: str | None) -> int | None:
    m = CLOSES.search(body or "")
    return int(m[1]) if m else None


class GitHubHandler:
    """`deliveries` handler for source "github"."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        clients: GitHubClients,
        notifier: GitHubNotifier,
        enqueue_job: Callable[[int], object],
    ):
        self.settings = settings
        self.store = store
        self.clients = clients
        self.notifier = notifier
        self.enqueue_job = enqueue_job

    def __call__(self, view: DeliveryView) -> int | None:
        name = view.event.split(".", 1)[0]
        try:
            event = events.parse(name, view.payload)
        except events.MalformedPayload as exc:
            raise Ignored(f"malformed {view.event} payload: {exc}") from exc
        # A comment that does not address the bot costs nothing: no token, no API call.
        if isinstance(event, events.Trigger) and event.comment_id is not None:
            if not events.mentions(event.comment_body, self.settings.github.bot_name):
                raise Ignored(f"the comment does not mention @{self.settings.github.bot_name}")
        self.clients.remember_installation(event.repo, event.installation_id)
        if isinstance(event, events.Trigger):
            try:
                return self._trigger(event, view)
            except Ignored:
                raise
            except Exception as exc:
                self._tell_gave_up(event, exc)
                raise
        if isinstance(event, events.ReviewSubmitted):
            return self._review(event)
        if isinstance(event, events.ReviewCommentCreated):
            return self._review_comment(event)
        if isinstance(event, events.ReviewDismissed):
            return self._dismissed(event)
        if isinstance(event, events.PullRequestReopened):
            return self._reopened(event)
        return self._closed(event)

    # ------------------------------------------------------------ who the bot is

    def is_self(self, login: str | None) -> bool:
        """Whether `login` is the bot itself: the identity the API reports for its
        credentials (the App's `<slug>[bot]`, or a personal token's owner), or the
        configured `bot_login`."""
        if not login:
            return False
        if login == self.settings.github.bot_login:
            return True
        try:
            return login == self.clients.identity()
        except Exception as exc:  # noqa: BLE001 - GitHub unreachable: fail the delivery
            raise RuntimeError(f"cannot tell who codeloop is on GitHub: {describe(exc)}") from exc

    def _tell_gave_up(self, ev: events.Trigger, exc: Exception) -> None:
        """GitHub still failed after the retries: say so on the issue, if GitHub lets us."""
        if ev.sender_is_bot:
            return
        try:
            self._remote(ev.repo).get_issue(ev.number).create_comment(
                f"codeloop gave up on this request: {describe(exc)}. "
                "Add the label again (or mention codeloop) to retry."
            )
        except Exception:  # noqa: BLE001 - GitHub is failing; the delivery is marked failed
            log.warning("%s#%s: could not tell the issue that codeloop gave up", ev.repo, ev.number)

    # ------------------------------------------------------------ helpers

    def _remote(self, repo: str):
        return self.clients.for_repo(repo).get_repo(repo)

    def _bot_pr(self, repo: str, number: int) -> tuple[int, int, str] | None:
        """(pull request row id, request id, state) of a pull request codeloop opened."""
        with self.store.session() as s:
            pr = s.scalar(
                select(PullRequest).where(
                    PullRequest.forge == "github",
                    PullRequest.repo == repo,
                    PullRequest.number == number,
                )
            )
            return None if pr is None else (pr.id, pr.request_id, pr.state)

    def _open_pr_for_issue(self, repo: str, issue: int) -> tuple[int, int] | None:
        with self.store.session() as s:
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

    def _job_running_for_issue(self, repo: str, issue: int) -> int | None:
        """The id of a queued or running job for the issue, if there is one."""
        with self.store.session() as s:
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

    def _can_write(self, remote, login: str) -> tuple[bool, str]:
        from github import GithubException

        try:
            permission = remote.get_collaborator_permission(login)
        except GithubException as exc:
            if exc.status in (403, 404):
                return False, "none"
            raise
        return permission in WRITE, permission

    def _refuse(self, remote, number: int, login: str, permission: str) -> None:
        # Never name the trigger (`@codeloop`, the label) here: with a personal token this
        # comment is posted as a person with write access, and GitHub delivers it back.
        remote.get_issue(number).create_comment(
            f"Thanks @{login}! codeloop only takes requests from people with write access to "
            f"{remote.full_name}, so it will not act on this one. A maintainer of the "
            "repository can start it."
        )
        raise Ignored(f"{login} has {permission!r} permission on {remote.full_name}, not write")

    # ------------------------------------------------------------ triggers

    def _trigger(self, ev: events.Trigger, view: DeliveryView) -> int | None:
        gh = self.settings.github
        if ev.sender_is_bot or self.is_self(ev.sender):
            raise Ignored("an action by a bot (or by codeloop itself)")
        if ev.on_pull_request:
            return self._comment_on_pr(ev)
        if ev.issue_state != "open":
            raise Ignored(f"the issue is {ev.issue_state}")
        if ev.locked:
            raise Ignored("the issue is locked")
        remote = self._remote(ev.repo)
        if ev.label is not None:
            try:
                config = parse_repo_config(self._read_config(remote))
            except RepoConfigError as exc:
                remote.get_issue(ev.number).create_comment(f"codeloop cannot start: {exc}")
                raise Ignored(str(exc)) from exc
            # GitHub's labels are case-insensitive ("Codeloop" is the label "codeloop").
            if ev.label.casefold() != config.trigger_label.casefold():
                raise Ignored(
                    f"label {ev.label!r} is not the trigger label {config.trigger_label!r}"
                )

        can, permission = self._can_write(remote, ev.sender)
        if not can:
            self._refuse(remote, ev.number, ev.sender, permission)
        issue = remote.get_issue(ev.number)
        running = self._job_running_for_issue(ev.repo, ev.number)
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
        existing = self._open_pr_for_issue(ev.repo, ev.number)
        if existing is not None:  # a second trigger updates the open pull request
            pr_id, request_id = existing
            feedback = (ev.comment_body or f"The issue now says:\n{ev.title}\n\n{ev.body}").strip()
            job_id, created = jobs.submit_revision(
                self.store,
                request_id=request_id,
                pull_request_id=pr_id,
                feedback=feedback,
                key=f"revise:github:{view.delivery_id}",
            )
            if created:
                self._start(job_id)
            return request_id

        requirement = f"{ev.title}\n\n{ev.body}".strip()
        if ev.comment_body and ev.comment_id is not None:
            extra = re.sub(
                rf"@{re.escape(gh.bot_name)}\b", "", ev.comment_body, flags=re.IGNORECASE
            ).strip()
            if extra:
                requirement += f"\n\n{extra}"
        try:
            sub = jobs.submit(
                self.store,
                source="github",
                repo=ev.repo,
                requirement=requirement,
                max_bytes=self.settings.pipeline.max_requirement_bytes,
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
            self._start(sub.job_id)
        return sub.request_id

    def _read_config(self, remote) -> str | None:
        from github import UnknownObjectException

        try:
            content = remote.get_contents(".codeloop.yml", ref=remote.default_branch)
        except UnknownObjectException:
            return None
        return None if isinstance(content, list) else content.decoded_content.decode()

    def _start(self, job_id: int) -> None:
        try:
            self.notifier.queued(job_id)
        except Exception:  # noqa: BLE001 - progress is best effort; the job still runs
            log.exception("job %s: could not post the status comment", job_id)
        self.enqueue_job(job_id)

    def _comment_on_pr(self, ev: events.Trigger) -> int | None:
        found = self._bot_pr(ev.repo, ev.number)
        if found is None:
            raise Ignored("a comment on a pull request codeloop did not open")
        if ev.label is not None:
            raise Ignored("a label on a pull request")
        pr_id, request_id, state = found
        record_signal(
            self.store,
            pr_id,
            kind="commented",
            source="github",
            external_id=f"issue-comment-{ev.comment_id}",
            body=ev.comment_body,
            author=ev.sender,
        )
        if state != "open":
            raise Ignored(f"the pull request is {state}")
        remote = self._remote(ev.repo)
        can, permission = self._can_write(remote, ev.sender)
        if not can:
            self._refuse(remote, ev.number, ev.sender, permission)
        remote.get_issue(ev.number).get_comment(ev.comment_id).create_reaction("eyes")
        feedback = re.sub(
            rf"@{re.escape(self.settings.github.bot_name)}\b",
            "",
            ev.comment_body or "",
            flags=re.IGNORECASE,
        ).strip()
        self._revise(
            remote,
            ev.number,
            pr_id,
            request_id,
            reviewer=ev.sender,
            summary=feedback,
            key=f"revise:github:comment-{ev.comment_id}",
        )
        return request_id

    # ------------------------------------------------------------ reviews

    def _review(self, ev: events.ReviewSubmitted) -> int | None:
        if ev.author_is_bot or self.is_self(ev.author):
            raise Ignored("a review by a bot (or by codeloop itself)")
        found = self._bot_pr(ev.repo, ev.pr_number)
        if found is None:
            raise Ignored("a review of a pull request codeloop did not open")
        pr_id, request_id, state = found
        record_signal(
            self.store,
            pr_id,
            kind=ev.state,
            source="github",
            external_id=f"review-{ev.review_id}",
            body=ev.body or None,
            author=ev.author,
        )
        wants = ev.state == "changes_requested" or events.mentions(
            ev.body, self.settings.github.bot_name
        )
        if not wants:
            return request_id
        if state != "open":
            raise Ignored(f"the pull request is {state}; nothing to revise")
        remote = self._remote(ev.repo)
        can, permission = self._can_write(remote, ev.author)
        if not can:
            self._refuse(remote, ev.pr_number, ev.author, permission)
        self._revise(
            remote,
            ev.pr_number,
            pr_id,
            request_id,
            reviewer=ev.author,
            summary=ev.body,
            key=f"revise:github:review-{ev.review_id}",
        )
        return request_id

    def _revise(
        self,
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
        mine = {c.id for c in all_comments if c.user is not None and self.is_self(c.user.login)}
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
            record_signal(
                self.store,
                pr_id,
                kind="line_comment",
                source="github",
                external_id=f"review-comment-{c['id']}",
                body=c["body"],
                author=c["author"],
                path=c["path"],
                line=c["line"],
            )
        feedback = compose_feedback(summary or "", reviewer, open_comments)
        job_id, created = jobs.submit_revision(
            self.store, request_id=request_id, pull_request_id=pr_id, feedback=feedback, key=key
        )
        if not created:
            return
        with self.store.session() as s:
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
        self._start(job_id)

    def _review_comment(self, ev: events.ReviewCommentCreated) -> int | None:
        found = self._bot_pr(ev.repo, ev.pr_number)
        if found is None:
            raise Ignored("a review comment on a pull request codeloop did not open")
        if ev.author_is_bot or self.is_self(ev.author):
            raise Ignored("a review comment by a bot (or by codeloop itself)")
        pr_id, request_id, state = found
        name = self.settings.github.bot_name
        asks = events.mentions(ev.body, name)
        if ev.in_reply_to is not None:  # a reply inside a review thread: talk, not a new comment
            if not asks:
                raise Ignored("a reply inside a review thread (not a line comment)")
        else:
            self._line_signal(ev, pr_id)
        if not asks:
            return request_id
        # `@codeloop` on a line of the diff asks for a revision, as in a review body.
        if state != "open":
            raise Ignored(f"the pull request is {state}; nothing to revise")
        remote = self._remote(ev.repo)
        can, permission = self._can_write(remote, ev.author)
        if not can:
            self._refuse(remote, ev.pr_number, ev.author, permission)
        text = re.sub(rf"@{re.escape(name)}\b", "", ev.body, flags=re.IGNORECASE).strip()
        where = f"{ev.path} line {ev.line}" if ev.line else (ev.path or "the diff")
        # A comment inside a review shares the review's key: the review and its comments,
        # delivered separately, make one revision.
        key = (
            f"revise:github:review-{ev.review_id}"
            if ev.review_id is not None and ev.in_reply_to is None
            else f"revise:github:review-comment-{ev.comment_id}"
        )
        self._revise(
            remote,
            ev.pr_number,
            pr_id,
            request_id,
            reviewer=ev.author,
            summary=f"On {where}: {text}" if ev.in_reply_to is not None else "",
            key=key,
        )
        return request_id

    def _line_signal(self, ev: events.ReviewCommentCreated, pr_id: int) -> None:
        record_signal(
            self.store,
            pr_id,
            kind="line_comment",
            source="github",
            external_id=f"review-comment-{ev.comment_id}",
            body=ev.body,
            author=ev.author,
            path=ev.path,
            line=ev.line,
        )

    def _dismissed(self, ev: events.ReviewDismissed) -> int | None:
        found = self._bot_pr(ev.repo, ev.pr_number)
        if found is None:
            raise Ignored("a dismissed review of a pull request codeloop did not open")
        before = dismiss_signal(self.store, source="github", external_id=f"review-{ev.review_id}")
        if before is None:
            raise Ignored(f"review {ev.review_id} was never stored")
        return found[1]

    def _reopened(self, ev: events.PullRequestReopened) -> int | None:
        found = self._bot_pr(ev.repo, ev.number)
        if found is None:
            raise Ignored("a pull request codeloop did not open was reopened")
        pr_id, request_id, _ = found
        with self.store.session() as s:
            pr = s.get(PullRequest, pr_id)
            if pr.state == "closed":
                pr.state = "open"
        return request_id

    # ------------------------------------------------------------ closed / merged

    def _closed(self, ev: events.PullRequestClosed) -> int | None:
        found = self._bot_pr(ev.repo, ev.number)
        stored_merge = False
        # Every merge is stored with the branch it went into; which branches are training
        # material is the dataset's decision (`.codeloop.yml` `training_branches`).
        if ev.merged and self._keeps_merged(ev.repo):
            stored_merge = self._store_merged(ev, found[0] if found else None)
        if found is None:
            if stored_merge:
                return None
            raise Ignored("a pull request codeloop did not open was closed")
        pr_id, request_id, _ = found
        with self.store.session() as s:
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
            if jobs.cancel(self.store, job_id):
                why = "merged" if ev.merged else "closed"
                try:
                    self.notifier.finished(
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
            self.store,
            pr_id,
            kind="merged" if ev.merged else "closed_unmerged",
            source="github",
            external_id=external_id[:200],
            author=ev.sender or None,
        )
        return request_id

    def _keeps_merged(self, repo: str) -> bool:
        wanted = self.settings.github.merged_repos
        return not wanted or repo in wanted

    def _store_merged(self, ev: events.PullRequestClosed, pr_id: int | None) -> bool:
        from github import GithubException

        with self.store.session() as s:
            exists = s.scalar(
                select(MergedChange.id).where(
                    MergedChange.forge == "github",
                    MergedChange.repo == ev.repo,
                    MergedChange.external_id == str(ev.number),
                )
            )
        if exists is not None:
            return True
        remote = self._remote(ev.repo)
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
        try:
            with self.store.session() as s:
                s.add(
                    MergedChange(
                        forge="github",
                        repo=ev.repo,
                        external_id=str(ev.number),
                        title=ev.title,
                        body=ev.body,
                        issue_number=issue_no,
                        issue_title=issue_title,
                        issue_body=issue_body,
                        diff=diff,
                        base_sha=ev.base_sha,
                        base_ref=ev.base_ref or None,
                        merge_sha=ev.merge_sha,
                        author=ev.author or None,
                        by_bot=pr_id is not None,
                        pull_request_id=pr_id,
                        **({"merged_at": _when(ev.merged_at)} if _when(ev.merged_at) else {}),
                    )
                )
        except IntegrityError:
            pass  # stored by a concurrent redelivery
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
