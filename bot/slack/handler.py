"""The worker side of a Slack delivery: decide, store, answer in the thread.

Registered as `delivery_handlers["slack"]` (bot.runtime). Each stored delivery is parsed
(bot.slack.events) and handled once:

- a requirement (message in a linked channel, @mention, `/codeloop <requirement>`) →
  `jobs.submit` keyed on the message, the thread recorded, "Queued as #N for repo";
- a reply in a codeloop thread → `jobs.submit_revision` on the same pull request;
- `/codeloop link|unlink|status|retrain|schedule` → maintainer commands (admins only);
- Retry / Cancel buttons → a new job for the failed one / `jobs.cancel`.

Anything that needs no action raises `deliveries.Ignored` with the reason (stored on the
delivery). A person who sent something unusable always gets an answer saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.webhook import WebhookClient
from sqlalchemy import delete, func, select

from bot import jobs
from bot.deliveries import DeliveryView, Ignored
from bot.forges import Forge, ForgeError
from bot.settings import Settings
from bot.slack import events, messages
from bot.slack.messages import escape
from bot.slack.events import Ask, Button, Command, Skip, SlackPayloadError, ThreadReply
from bot.store.db import Store, insert_or_get
from bot.store.models import (
    Job,
    ModelVersion,
    PullRequest,
    Request,
    ReviewSignal,
    SlackChannelLink,
    SlackThread,
    utcnow,
)

log = logging.getLogger(__name__)

TRAINING_MISSING = "training is not available in this build"
NOT_IN_CHANNEL = ("not_in_channel", "channel_not_found")


# ---------------------------------------------------------------- store helpers


def linked_repo(store: Store, channel: str) -> str | None:
    with store.session() as s:
        return s.scalar(select(SlackChannelLink.repo).where(SlackChannelLink.channel_id == channel))


def link_channel(store: Store, channel: str, repo: str, by: str) -> None:
    """Map a channel to a repository (replacing an earlier link)."""
    with store.session() as s:
        row = s.scalar(select(SlackChannelLink).where(SlackChannelLink.channel_id == channel))
        if row is None:
            s.add(SlackChannelLink(channel_id=channel, repo=repo, linked_by=by))
        else:
            row.repo, row.linked_by, row.created_at = repo, by, utcnow()


def unlink_channel(store: Store, channel: str) -> str | None:
    with store.session() as s:
        repo = s.scalar(select(SlackChannelLink.repo).where(SlackChannelLink.channel_id == channel))
        s.execute(delete(SlackChannelLink).where(SlackChannelLink.channel_id == channel))
        return repo


def thread_request(store: Store, channel: str, thread_ts: str) -> tuple[int, str] | None:
    """(request id, Slack user who asked) for a codeloop thread."""
    with store.session() as s:
        row = s.scalar(select(SlackThread).where(SlackThread.channel_id == channel,
                                                 SlackThread.thread_ts == thread_ts))
        return (row.request_id, row.user_id) if row else None


def _remember_thread(
    store: Store, channel: str, thread_ts: str, request_id: int, user: str
) -> None:
    with store.session() as s:  # recorded once, even by a concurrent handling of the message
        insert_or_get(s, SlackThread, dict(channel_id=channel, thread_ts=thread_ts,
                                           request_id=request_id, user_id=user),
                      key=("request_id",))


def requester_label(settings: Settings, user: str) -> str:
    """How the PR body names the person: their Slack id, and @login when GitHub knows them."""
    login = settings.slack.github_logins.get(user)
    return f"Slack user {user}" + (f" (@{login})" if login else "")


# ---------------------------------------------------------------- status


def status_text(settings: Settings, store: Store, repo: str | None = None) -> str:
    """`/codeloop status`: queue, running jobs, active model, last training, approval rate."""
    since = utcnow() - timedelta(days=30)
    with store.session() as s:
        queued = s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued"))
        running = s.execute(
            select(Job.id, Request.repo, Job.started_at).join(Request)
            .where(Job.state == "running").order_by(Job.id)
        ).all()
        active = s.scalar(select(ModelVersion.name).where(ModelVersion.status == "active")
                          .order_by(ModelVersion.created_at.desc()))
        counts = dict(s.execute(
            select(ReviewSignal.kind, func.count()).where(ReviewSignal.created_at >= since)
            .group_by(ReviewSignal.kind)
        ).all())
    lines = [f"*Queue:* {queued} waiting, {len(running)} running"]
    for job_id, job_repo, started in running:
        took = messages.elapsed((utcnow() - started).total_seconds()) if started else "?"
        lines.append(f"  • job {job_id} on {escape(job_repo)} ({took})")
    lines.append(f"*Model:* {active or settings.backend.model + ' (base model, no adapter)'}")
    lines.append(f"*Last training run:* {_last_training(store, repo)}")
    approved, rejected = counts.get("approved", 0), counts.get("changes_requested", 0)
    if approved + rejected:
        rate = approved / (approved + rejected)
        lines.append(f"*Approval rate (30 days):* {rate:.0%} ({approved} approved, "
                     f"{rejected} changes requested)")
    else:
        lines.append("*Approval rate (30 days):* no reviews yet")
    return "\n".join(lines)


def _last_training(store: Store, repo: str | None) -> str:
    try:
        from training.registry import last_training_run
    except ImportError:
        return TRAINING_MISSING
    run = last_training_run(store, repo)
    if not run:
        return "none yet"
    parts = [f"#{run.get('id', '?')}"]
    for key in ("state", "status", "result", "finished_at", "created_at"):
        if run.get(key) is not None:
            parts.append(f"{key}: {run[key]}")
    return escape(", ".join(str(p) for p in parts))


# ---------------------------------------------------------------- the handler


class SlackHandler:
    """`delivery_handlers["slack"]`: one stored Slack delivery → its effect and its answer."""

    # Puts a training run on the queue (set by the composition root; without it a worker's
    # recovery sweep enqueues the recorded run).
    enqueue_training: Callable[[int], object] | None = None

    def __init__(self, settings: Settings, store: Store, client: WebClient, forge: Forge,
                 enqueue_job: Callable[[int], object]):
        self.settings = settings
        self.store = store
        self.client = client
        self.forge = forge
        self.enqueue_job = enqueue_job

    def __call__(self, view: DeliveryView) -> int | None:
        try:
            item = events.parse(view.event, view.payload)
        except SlackPayloadError as exc:
            raise Ignored(f"malformed Slack payload: {exc}") from exc
        if isinstance(item, Skip):
            raise Ignored(item.reason)
        if isinstance(item, Ask):
            return self.ask(item)
        if isinstance(item, ThreadReply):
            return self.follow_up(item)
        if isinstance(item, Command):
            return self.command(item)
        return self.button(item)

    # -------------------------------------------------------------- answering

    def _say(self, channel: str, text: str, thread_ts: str | None = None) -> str | None:
        resp = self.client.chat_postMessage(channel=channel, text=text, thread_ts=thread_ts)
        return resp.get("ts")

    def _whisper(self, channel: str, user: str, text: str,
                 response_url: str | None = None, thread_ts: str | None = None) -> None:
        """Only `user` sees it (in the thread, when given). In a channel the bot is not in, a
        slash command's answer goes through its response_url instead."""
        try:
            self.client.chat_postEphemeral(channel=channel, user=user, text=text,
                                           thread_ts=thread_ts)
        except SlackApiError as exc:
            if response_url is None or exc.response.get("error") not in NOT_IN_CHANNEL:
                raise
            WebhookClient(response_url, timeout=int(self.settings.slack.timeout_seconds)).send(
                text=text, response_type="ephemeral")

    def _answer(self, item: Ask, text: str) -> None:
        if item.via == "command":
            self._whisper(item.channel, item.user, text, item.response_url)
        else:
            self._say(item.channel, text, thread_ts=item.thread_ts or item.ts)

    # -------------------------------------------------------------- requirements

    def ask(self, item: Ask) -> int | None:
        linked = linked_repo(self.store, item.channel)
        if item.via == "message":  # no mention: only a linked channel's own repository
            if linked is None:
                raise Ignored("a message in a channel that is not linked to a repository")
            if item.repo is not None and item.repo != linked:
                if item.mentions_bot:  # its app_mention copy makes the request
                    raise Ignored("a message naming another repository; its mention decides")
                self._answer(item, f"This channel is linked to {escape(linked)}. To ask for a "
                                   f"change in {escape(item.repo)}, mention me in the message.")
                raise Ignored("a plain message naming another repository than the linked one")
        repo = item.repo or linked
        if repo is None:
            self._answer(item, messages.not_linked().text)
            raise Ignored("channel not linked and no repo= given; told the requester")
        if not item.text.strip():
            self._answer(item, "What should the change do? Write the requirement after the "
                               "mention, e.g. `@codeloop add a --verbose flag`.")
            raise Ignored("empty requirement")
        try:
            info = self.forge.check_repository(repo)
        except ForgeError as exc:
            self._answer(item, f"I can't work on {escape(repo)}: {escape(str(exc))}")
            raise Ignored(f"repository refused: {exc}") from exc
        thread_ts = item.thread_ts or item.ts
        if item.via == "command":  # a slash command has no message: start the thread
            try:
                thread_ts = self._say(item.channel,
                                      f"<@{item.user}> asked for: {escape(item.text)}")
            except SlackApiError as exc:
                if exc.response.get("error") not in NOT_IN_CHANNEL:
                    raise
                self._answer(item, "I'm not in this channel, so I can't start a thread here: "
                                   "invite me with `/invite @codeloop`, then ask again.")
                raise Ignored("slash command in a channel the bot is not in") from exc
        try:
            sub = jobs.submit(
                self.store, source="slack", repo=info.repo, requirement=item.text,
                max_bytes=self.settings.pipeline.max_requirement_bytes,
                requester=requester_label(self.settings, item.user),
                reply_to={"channel": item.channel, "thread_ts": thread_ts, "user": item.user,
                          "asked_ts": item.ts},
                delivery=item.key,
            )
        except jobs.BadRequest as exc:
            self._answer(item, escape(str(exc)))
            raise Ignored(str(exc)) from exc
        _remember_thread(self.store, item.channel, thread_ts, sub.request_id, item.user)
        if not sub.created:
            self.enqueue_job(sub.job_id)  # its first enqueue may be what was lost; claims dedupe
            raise Ignored(f"request #{sub.request_id} was made from this message before")
        with self.store.session() as s:
            truncated = s.get(Request, sub.request_id).truncated
        reply = messages.queued(sub.request_id, info.repo,
                                self.settings.pipeline.max_requirement_bytes if truncated else None)
        try:  # "Queued" first, so it comes before the progress message in the thread
            self._say(item.channel, reply.text, thread_ts=thread_ts)
        finally:
            self.enqueue_job(sub.job_id)
        return sub.request_id

    def follow_up(self, item: ThreadReply) -> int | None:
        found = thread_request(self.store, item.channel, item.thread_ts)
        if found is None:
            if item.mention:  # "@codeloop do X" inside someone's thread: a request, there
                text, repo = events.split_repo(item.text)
                return self.ask(Ask(via="mention", channel=item.channel, user=item.user,
                                    text=text, repo=repo, ts=item.ts, thread_ts=item.thread_ts,
                                    key=f"{item.channel}:{item.ts}"))
            raise Ignored("a reply in a thread that is not codeloop's")
        request_id, requester = found
        with self.store.session() as s:
            asked_ts = (s.get(Request, request_id).reply_to or {}).get("asked_ts")
        if asked_ts == item.ts:  # the @mention that made the request, as its `message` copy
            raise Ignored("the message that made this request (its app_mention copy)")
        if item.mentions_bot and not item.mention:
            raise Ignored("a mention of the bot: its app_mention copy is the one handled")
        may_revise = (item.user == requester or item.mention or self.is_admin(item.user)
                      or item.user in self.settings.slack.revisers)
        if not may_revise:  # people talking in the thread ("thanks!", "lunch at 12?")
            raise Ignored("a reply by someone other than the requester, without a mention")
        if not item.text.strip():
            raise Ignored("an empty reply")
        with self.store.session() as s:
            pr = s.scalar(select(PullRequest).where(PullRequest.request_id == request_id))
            pr_view = (pr.id, pr.number, pr.state) if pr else None
        if pr_view is None:
            self._say(item.channel, "The pull request is not open yet; send this again once "
                      "it is, and I'll revise it.", thread_ts=item.thread_ts)
            raise Ignored("follow-up before the pull request exists")
        pr_id, number, state = pr_view
        if state != "open":
            self._say(item.channel, f"Pull request #{number} is {state}; start a new request "
                      "for further changes.", thread_ts=item.thread_ts)
            raise Ignored(f"follow-up on a {state} pull request")
        # The follow-up is review feedback on the revision it answers (a comment: it may ask
        # for more as well as for different); the learning loop reads it with the others.
        from feedback.signals import record_signal

        record_signal(self.store, pr_id, kind="commented", source="slack",
                      external_id=f"{item.channel}:{item.ts}", body=item.text,
                      author=requester_label(self.settings, item.user))
        job_id, created = jobs.submit_revision(
            self.store, request_id=request_id, pull_request_id=pr_id, feedback=item.text,
            key=f"slack-followup:{item.channel}:{item.ts}",
        )
        if not created:
            self.enqueue_job(job_id)
            raise Ignored("this follow-up was handled before")
        try:
            self._say(item.channel, messages.revising(number, job_id).text,
                      thread_ts=item.thread_ts)
        finally:
            self.enqueue_job(job_id)
        return request_id

    # -------------------------------------------------------------- commands

    def is_admin(self, user: str) -> bool:
        return user in self.settings.slack.admins

    def command(self, item: Command) -> None:
        if item.name == "help":
            self._whisper(item.channel, item.user, messages.HELP, item.response_url)
            raise Ignored("help shown")
        if not self.is_admin(item.user):
            self._whisper(item.channel, item.user,
                          f"Sorry, `/codeloop {item.name}` is for codeloop admins. Ask one of "
                          "them, or set CODELOOP_SLACK__ADMINS to include you.", item.response_url)
            raise Ignored(f"{item.user} is not an admin ({item.name})")
        text = getattr(self, f"cmd_{item.name}")(item)
        self._whisper(item.channel, item.user, text, item.response_url)
        return None

    def cmd_link(self, item: Command) -> str:
        repo = item.arg.strip().strip("<>")
        if not repo:
            return "Usage: `/codeloop link owner/name`"
        try:
            info = self.forge.check_repository(repo)
        except ForgeError as exc:
            return f"I can't link {escape(repo)}: {escape(str(exc))}"
        link_channel(self.store, item.channel, info.repo, item.user)
        self._say(item.channel, f"<@{item.user}> linked this channel to {escape(info.repo)}: "
                  "messages here become pull requests there.")
        return f"Linked to {escape(info.repo)}."

    def cmd_unlink(self, item: Command) -> str:
        repo = unlink_channel(self.store, item.channel)
        return f"Unlinked from {escape(repo)}." if repo else "This channel was not linked."

    def cmd_status(self, item: Command) -> str:
        return status_text(self.settings, self.store, linked_repo(self.store, item.channel))

    def _training_repo(self, item: Command, arg: str) -> tuple[str | None, str]:
        rest, repo = events.split_repo(arg)
        return repo or linked_repo(self.store, item.channel), rest

    def cmd_retrain(self, item: Command) -> str:
        repo, rest = self._training_repo(item, item.arg)
        if rest.strip().lower() != "now":
            return "Usage: `/codeloop retrain now` (in a linked channel, or add `repo=owner/name`)"
        if repo is None:
            return messages.not_linked().text
        try:
            from training.schedule import retrain_now
        except ImportError:
            return TRAINING_MISSING
        run_id = retrain_now(self.settings, self.store, repo, requested_by=item.user,
                             enqueue=self.enqueue_training)
        return f"Training run #{run_id} queued for {escape(repo)}."

    def cmd_schedule(self, item: Command) -> str:
        repo, rest = self._training_repo(item, item.arg)
        cron = rest.strip()
        if not cron:
            return ("Usage: `/codeloop schedule <cron>` (e.g. `0 3 * * 1`) or "
                    "`/codeloop schedule off`")
        if repo is None:
            return messages.not_linked().text
        try:
            from training.schedule import pause_schedule, set_schedule
        except ImportError:
            return TRAINING_MISSING
        if cron.lower() == "off":
            pause_schedule(self.settings, repo)
            return f"Retraining for {escape(repo)} is paused."
        try:
            described = set_schedule(self.settings, repo, cron)
        except ValueError as exc:
            return f"That schedule was not accepted: {escape(str(exc))}"
        return f"Retraining {escape(repo)}: {escape(described)}."

    # -------------------------------------------------------------- buttons

    def button(self, item: Button) -> int | None:
        with self.store.session() as s:
            job = s.get(Job, item.job_id)
            if job is None:
                self._whisper(item.channel, item.user, f"There is no job {item.job_id}.")
                raise Ignored(f"no job {item.job_id}")
            state, request_id = job.state, job.request_id
            kind, pr_id, feedback = job.kind, job.pull_request_id, job.feedback
        asked = thread_request_by_id(self.store, request_id)
        thread_ts = asked[0] if asked else None
        allowed = self.is_admin(item.user) or (asked is not None and asked[1] == item.user)
        if not allowed:
            self._whisper(item.channel, item.user, "Only the person who asked, or a codeloop "
                          f"admin, can {item.name} this job.", thread_ts=thread_ts)
            raise Ignored(f"{item.user} may not {item.name} job {item.job_id}")
        if item.name == "cancel":
            if jobs.cancel(self.store, item.job_id):
                self._say(item.channel, f"<@{item.user}> cancelled #{request_id} (job "
                          f"{item.job_id}); it stops before its next stage.", thread_ts=thread_ts)
                return request_id
            self._whisper(item.channel, item.user,
                          f"#{request_id} (job {item.job_id}) {messages.state_words(state)}; "
                          "nothing to cancel.", thread_ts=thread_ts)
            raise Ignored(f"cancel of a {state} job")
        if state != "failed":
            self._whisper(item.channel, item.user,
                          f"#{request_id} (job {item.job_id}) {messages.state_words(state)}; "
                          "nothing to retry.", thread_ts=thread_ts)
            raise Ignored(f"retry of a {state} job")
        new_id, created = _retry_job(self.store, item.job_id, request_id, kind, pr_id, feedback)
        try:
            if created:
                self._say(item.channel, f"<@{item.user}> asked to try again: #{request_id} runs as "
                          f"job {new_id}.", thread_ts=thread_ts)
            else:
                self._whisper(item.channel, item.user, f"Already trying again as job {new_id}.",
                              thread_ts=thread_ts)
        finally:
            self.enqueue_job(new_id)
        return request_id if created else None


def thread_request_by_id(store: Store, request_id: int) -> tuple[str, str] | None:
    """(thread ts, Slack user who asked) of a request's thread."""
    with store.session() as s:
        row = s.scalar(select(SlackThread).where(SlackThread.request_id == request_id))
        return (row.thread_ts, row.user_id) if row else None


def _retry_job(store: Store, failed_id: int, request_id: int, kind: str, pr_id: int | None,
               feedback: str | None) -> tuple[int, bool]:
    """One new job per failed job (a second click finds the first retry)."""
    return jobs.add_job(store, key=f"retry:{failed_id}", request_id=request_id, kind=kind,
                        pull_request_id=pr_id, feedback=feedback)