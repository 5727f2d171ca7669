"""The store's tables: request → job (with stage history) → pull request → revisions → signals.

SQLAlchemy 2 typed models. Schema changes go through alembic (bot/store/migrations).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Request(Base):
    """A requirement as it arrived, once per idempotency key (a redelivery finds this row)."""

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(20))  # cli | github | slack
    repo: Mapped[str] = mapped_column(String(500))  # path (local forge) or owner/name
    requirement: Mapped[str] = mapped_column(Text)
    truncated: Mapped[bool] = mapped_column(default=False)
    requester: Mapped[str | None] = mapped_column(String(200))
    reply_to: Mapped[dict[str, Any]] = mapped_column(default=dict)  # where progress goes
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="request", order_by="Job.id")


class Job(Base):
    """One run of the pipeline: create a pull request, or revise one."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)  # idempotency key of the job
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id"))
    kind: Mapped[str] = mapped_column(String(20), default="create")  # create | revise
    pull_request_id: Mapped[int | None] = mapped_column(ForeignKey("pull_requests.id"))
    feedback: Mapped[str | None] = mapped_column(Text)  # review text a revision addresses
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    # queued | running | succeeded | failed | cancelled
    runs: Mapped[int] = mapped_column(default=0)  # how many times a worker claimed it
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    request: Mapped[Request] = relationship(back_populates="jobs")
    stages: Mapped[list[JobStage]] = relationship(
        back_populates="job", order_by="JobStage.id", cascade="all, delete-orphan"
    )


class JobStage(Base):
    """One attempt at one pipeline stage; a `done` row is the stage's checkpoint."""

    __tablename__ = "job_stages"
    __table_args__ = (Index("ix_job_stages_job_name", "job_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    name: Mapped[str] = mapped_column(String(50))
    state: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    seconds: Mapped[float | None]
    output: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="stages")


class PullRequest(Base):
    __tablename__ = "pull_requests"
    __table_args__ = (UniqueConstraint("forge", "repo", "branch"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id"), unique=True)
    forge: Mapped[str] = mapped_column(String(20))  # local | github
    repo: Mapped[str] = mapped_column(String(500))
    number: Mapped[int | None]  # the forge's number (local: same as id)
    url: Mapped[str | None] = mapped_column(String(1000))
    branch: Mapped[str] = mapped_column(String(300))
    base_branch: Mapped[str] = mapped_column(String(300))
    title: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), default="open")  # open | merged | closed
    model_version: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    merged_at: Mapped[datetime | None]

    revisions: Mapped[list[Revision]] = relationship(
        back_populates="pull_request", order_by="Revision.number"
    )
    signals: Mapped[list[ReviewSignal]] = relationship(
        back_populates="pull_request", order_by="ReviewSignal.id"
    )


class Revision(Base):
    """One commit the bot pushed to a pull request's branch."""

    __tablename__ = "revisions"
    __table_args__ = (UniqueConstraint("pull_request_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pull_request_id: Mapped[int] = mapped_column(ForeignKey("pull_requests.id"))
    number: Mapped[int]
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    commit_sha: Mapped[str] = mapped_column(String(64))
    diff: Mapped[str] = mapped_column(Text)
    diff_stat: Mapped[str] = mapped_column(Text)
    validation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    model_version: Mapped[str] = mapped_column(String(200))
    trigger: Mapped[str] = mapped_column(String(20))  # initial | review | followup
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    pull_request: Mapped[PullRequest] = relationship(back_populates="revisions")


class ReviewSignal(Base):
    """How people received a pull request: the training signal."""

    __tablename__ = "review_signals"
    __table_args__ = (UniqueConstraint("source", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    pull_request_id: Mapped[int] = mapped_column(ForeignKey("pull_requests.id"))
    revision_id: Mapped[int | None] = mapped_column(ForeignKey("revisions.id"))
    kind: Mapped[str] = mapped_column(String(30), index=True)
    # approved | changes_requested | commented | line_comment | merged | closed_unmerged
    body: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(String(1000))
    line: Mapped[int | None]
    author: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))  # local | github | slack
    external_id: Mapped[str] = mapped_column(String(200))  # dedupes redeliveries
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    pull_request: Mapped[PullRequest] = relationship(back_populates="signals")


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    base_model: Mapped[str] = mapped_column(String(200))
    adapter_path: Mapped[str | None] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    # candidate | active | retired | rejected
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_card: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EditFormatStat(Base):
    """Per model and edit format: how many answers parsed well-formed (choose formats by data)."""

    __tablename__ = "edit_format_stats"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    format: Mapped[str] = mapped_column(String(30), primary_key=True)
    well_formed: Mapped[int] = mapped_column(default=0)
    malformed: Mapped[int] = mapped_column(default=0)


class Delivery(Base):
    """A webhook delivery or Slack event as received: stored once, handled by a worker.

    The web handler only verifies, inserts this row and enqueues; a redelivery (same
    source and delivery id) hits the unique constraint and is acknowledged and ignored.
    A row still `received` after its enqueue was lost is re-enqueued by the recovery sweep.
    """

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("source", "delivery_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(20))  # github | slack
    delivery_id: Mapped[str] = mapped_column(String(200))  # X-GitHub-Delivery, Slack event_id
    event: Mapped[str] = mapped_column(String(100))  # e.g. issues.labeled, event_callback
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(20), default="received", index=True)
    # received | handling (claimed by a worker) | handled | ignored | failed
    note: Mapped[str | None] = mapped_column(Text)  # why ignored / what failed
    request_id: Mapped[int | None] = mapped_column(ForeignKey("requests.id"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    handled_at: Mapped[datetime | None]


class MergedChange(Base):
    """A change merged into a served repository, the bot's or a person's: training material.

    Written by the forges (a merged GitHub pull request, `codeloop merge` on the local forge);
    read by the dataset builder (training/dataset.py).
    """

    __tablename__ = "merged_changes"
    __table_args__ = (UniqueConstraint("forge", "repo", "external_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    forge: Mapped[str] = mapped_column(String(20))  # github | local
    repo: Mapped[str] = mapped_column(String(500))
    external_id: Mapped[str] = mapped_column(String(200))  # PR number, or the merge commit
    title: Mapped[str] = mapped_column(String(1000))
    body: Mapped[str | None] = mapped_column(Text)
    issue_number: Mapped[int | None]
    issue_title: Mapped[str | None] = mapped_column(String(1000))
    issue_body: Mapped[str | None] = mapped_column(Text)
    diff: Mapped[str] = mapped_column(Text)
    base_sha: Mapped[str | None] = mapped_column(String(64))
    merge_sha: Mapped[str | None] = mapped_column(String(64))
    author: Mapped[str | None] = mapped_column(String(200))
    by_bot: Mapped[bool] = mapped_column(default=False)
    pull_request_id: Mapped[int | None] = mapped_column(ForeignKey("pull_requests.id"))
    merged_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # The branch it was merged into, as the forge reports it (None: not confirmed yet; the
    # dataset builder asks the forge once and stores it, with the forge's merged_at).
    base_ref: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------- Slack (bot/slack)


class SlackChannelLink(Base):
    """A Slack channel mapped to a repository: messages there become requests for it."""

    __tablename__ = "slack_channel_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(50), unique=True)
    repo: Mapped[str] = mapped_column(String(500))
    linked_by: Mapped[str] = mapped_column(String(50))  # Slack user id of the admin
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SlackThread(Base):
    """The Slack thread a request lives in: follow-ups there revise its pull request."""

    __tablename__ = "slack_threads"
    __table_args__ = (UniqueConstraint("channel_id", "thread_ts"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(50))
    thread_ts: Mapped[str] = mapped_column(String(50))
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id"), unique=True)
    user_id: Mapped[str] = mapped_column(String(50))  # the Slack user who asked
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SlackJobMessage(Base):
    """The one progress message of a job, edited in place (chat.update) as stages pass."""

    __tablename__ = "slack_job_messages"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(50))
    ts: Mapped[str] = mapped_column(String(50))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------- GitHub (bot/github)


class GitHubStatusComment(Base):
    """The one comment per job that codeloop edits in place as the job's stages pass."""

    __tablename__ = "github_status_comments"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    repo: Mapped[str] = mapped_column(String(500))  # owner/name
    number: Mapped[int]  # the issue or pull request the comment is on
    comment_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GitHubReviewReply(Base):
    """A review comment a revision job addresses; `reply_id` is set once codeloop answered it."""

    __tablename__ = "github_review_replies"
    __table_args__ = (UniqueConstraint("job_id", "comment_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    pull_request_id: Mapped[int] = mapped_column(ForeignKey("pull_requests.id"))
    comment_id: Mapped[int] = mapped_column(BigInteger)  # GitHub's review comment id
    path: Mapped[str | None] = mapped_column(String(1000))
    line: Mapped[int | None]
    body: Mapped[str] = mapped_column(Text)
    author: Mapped[str | None] = mapped_column(String(200))
    reply_id: Mapped[int | None] = mapped_column(BigInteger)
    replied_at: Mapped[datetime | None]


# ---------------------------------------------------------------- learning loop (training/)


class TrainingRun(Base):
    """One training run of one repository: scheduled (key = repository + fire time) or asked for.

    The key is unique, so a schedule that fires twice for the same time makes one run; the
    worker claims a run by moving it from `queued` to `running` under a lease its heartbeat
    renews, so it trains once. A run whose worker died (lease expired, or owner process gone)
    is taken over by another worker and resumes from its last checkpoint. The partial unique
    index allows one `running` run per repository, whichever worker holds it.
    """

    __tablename__ = "training_runs"
    __table_args__ = (
        Index("uq_training_runs_one_running", "repo", unique=True,
              sqlite_where=text("state = 'running'"),
              postgresql_where=text("state = 'running'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(700), unique=True)
    repo: Mapped[str] = mapped_column(String(500), index=True)
    trigger: Mapped[str] = mapped_column(String(20))  # schedule | manual
    requested_by: Mapped[str | None] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    # queued | running | succeeded | skipped | failed
    reason: Mapped[str | None] = mapped_column(Text)  # why skipped / failed, or the gate's verdict
    dataset_card: Mapped[dict[str, Any]] = mapped_column(default=dict)
    losses: Mapped[list[Any]] = mapped_column(default=list)  # [{"step": n, "loss": x}]
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    data_until: Mapped[datetime | None]  # newest merged change the run saw
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # seconds per phase
    runs: Mapped[int] = mapped_column(default=0, server_default="0")  # claims by workers
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    # running: the lease ends then unless renewed; queued: not to be claimed before then
    lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class ModelPromotion(Base):
    """A change of the serving model: promote (previous kept loaded for rollback) or rollback."""

    __tablename__ = "model_promotions"

    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[str] = mapped_column(String(20))  # promote | rollback
    version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    previous_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    actor: Mapped[str | None] = mapped_column(String(200))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Candidate(Base):
    """One generated change for one prompt (a job's attempt) and what validation found.

    Several candidates of the same prompt, one that passed and one that failed, are an
    execution-verified preference pair for the learning loop.
    """

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "idx"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column()
    idx: Mapped[int] = mapped_column()  # position in the batch the backend returned
    prompt: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the messages asked
    text: Mapped[str] = mapped_column(Text)  # the model's answer
    model: Mapped[str] = mapped_column(String(200))
    ok: Mapped[bool] = mapped_column(default=False)  # passed every check it ran
    chosen: Mapped[bool] = mapped_column(default=False)  # the one kept for the pull request
    score: Mapped[list[Any]] = mapped_column(default=list)  # the ranking key, best highest
    reason: Mapped[str | None] = mapped_column(Text)  # why it failed
    validation: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
