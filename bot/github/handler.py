"""The worker side of a GitHub delivery: decide, then act on GitHub and in the store.

Runs in a huey worker (`codeloop.handle_delivery` → `deliveries.handle` → here), never in
the web request. The parsed event is routed by its type (`ROUTES`) to one handler module
per feature (bot/github/handlers/): triggers on issues become jobs (for people with write
permission), comments and reviews on codeloop's pull requests become review signals and
revision jobs, closed pull requests become outcomes and, when merged, training material.
This class holds what those handlers share: who the bot is, the GitHub client of a
repository, the stored pull request, the write-permission gate, and starting a job.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from sqlalchemy import select

from bot.deliveries import DeliveryView, Ignored
from bot.forges.github import describe
from bot.forges.github_auth import GitHubClients
from bot.github import events
from bot.github.handlers import comments, issues, pulls, reviews
from bot.github.notifier import GitHubNotifier
from bot.settings import Settings
from bot.store.db import Store
from bot.store.models import PullRequest

log = logging.getLogger(__name__)

WRITE = {"admin", "maintain", "write"}

# Which feature handles which event: handler(github_handler, event, view) -> request id.
ROUTES: dict[type, Callable] = {
    events.Trigger: issues.trigger,
    events.ReviewSubmitted: reviews.submitted,
    events.ReviewCommentCreated: comments.review_comment,
    events.ReviewDismissed: reviews.dismissed,
    events.PullRequestReopened: pulls.reopened,
    events.PullRequestClosed: pulls.closed,
}


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
        handle = ROUTES[type(event)]
        if not isinstance(event, events.Trigger):
            return handle(self, event, view)
        try:
            return handle(self, event, view)
        except Ignored:
            raise
        except Exception as exc:
            self._tell_gave_up(event, exc)
            raise

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

    def without_mention(self, text: str | None) -> str:
        """`text` with every `@codeloop` taken out."""
        name = re.escape(self.settings.github.bot_name)
        return re.sub(rf"@{name}\b", "", text or "", flags=re.IGNORECASE).strip()

    def _tell_gave_up(self, ev: events.Trigger, exc: Exception) -> None:
        """GitHub still failed after the retries: say so on the issue, if GitHub lets us."""
        if ev.sender_is_bot:
            return
        try:
            self.remote(ev.repo).get_issue(ev.number).create_comment(
                f"codeloop gave up on this request: {describe(exc)}. "
                "Add the label again (or mention codeloop) to retry."
            )
        except Exception:  # noqa: BLE001 - GitHub is failing; the delivery is marked failed
            log.warning("%s#%s: could not tell the issue that codeloop gave up", ev.repo, ev.number)

    # ------------------------------------------------------------ shared by the handlers

    def remote(self, repo: str):
        return self.clients.for_repo(repo).get_repo(repo)

    def bot_pr(self, repo: str, number: int) -> tuple[int, int, str] | None:
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

    def require_bot_pr(self, repo: str, number: int, what: str) -> tuple[int, int, str]:
        """`bot_pr`, or Ignored: `what` (a review, a comment…) on a pull request codeloop
        did not open."""
        found = self.bot_pr(repo, number)
        if found is None:
            raise Ignored(f"{what} codeloop did not open")
        return found

    def require_write(self, remote, number: int, login: str) -> None:
        """Go on only for people with write access; others are told why, then Ignored."""
        from github import GithubException

        try:
            permission = remote.get_collaborator_permission(login)
        except GithubException as exc:
            if exc.status not in (403, 404):
                raise
            permission = "none"
        if permission in WRITE:
            return
        # Never name the trigger (`@codeloop`, the label) here: with a personal token this
        # comment is posted as a person with write access, and GitHub delivers it back.
        remote.get_issue(number).create_comment(
            f"Thanks @{login}! codeloop only takes requests from people with write access to "
            f"{remote.full_name}, so it will not act on this one. A maintainer of the "
            "repository can start it."
        )
        raise Ignored(f"{login} has {permission!r} permission on {remote.full_name}, not write")

    def revisable(self, repo: str, number: int, state: str, login: str, why: str = ""):
        """The repository's client when pull request `number` is open and `login` may write
        to it; Ignored otherwise (`why` ends the message for a pull request not open)."""
        if state != "open":
            raise Ignored(f"the pull request is {state}{why}")
        remote = self.remote(repo)
        self.require_write(remote, number, login)
        return remote

    def start(self, job_id: int) -> None:
        try:
            self.notifier.queued(job_id)
        except Exception:  # noqa: BLE001 - progress is best effort; the job still runs
            log.exception("job %s: could not post the status comment", job_id)
        self.enqueue_job(job_id)
