"""The retraining schedule (APScheduler 3.11, jobs in codeloop's database) and training runs.

Schedules live in APScheduler's SQLAlchemyJobStore in the same database as everything else
(SQLite or PostgreSQL), so they survive restarts. One scheduler process runs them
(`run_scheduler`); the `codeloop schedule ...` commands and Slack change the stored jobs and
the running scheduler picks the change up within seconds. Every repository the store knows
gets the default weekly schedule (`training.schedule`) unless one was set.

When a schedule fires it records a training run whose key is the repository plus the fire
time, and enqueues `codeloop.train` (huey) through the `enqueue` callable the composition root
passes in. A second fire for the same time finds the key and does nothing. A run is skipped,
with the reason stored, when fewer new merged changes arrived since the last successful run
than `training.min_new_examples`.

Runs are durable like jobs (bot/jobs.py, with the same leases: bot/leases.py): a worker
claims a run by moving it from `queued` to `running` under a lease that a heartbeat renews,
so a run trains once even when it is enqueued twice. A run whose worker died (lease expired,
or its process on this host gone) is taken over by the recovery sweep (`recoverable_runs`)
on any worker and resumes from its last checkpoint with the dataset it had saved; a run
whose enqueue was lost is enqueued by the same sweep. The database allows one running run
per repository; a second run of the same repository waits its turn. What a claimed run does
(dataset, training, the gate) is training/runs.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from bot import leases
from bot.settings import Settings
from bot.store.db import Store, insert_or_get
from bot.store.models import MergedChange, PullRequest, TrainingRun, utcnow

log = logging.getLogger(__name__)

JOBSTORE_TABLE = "codeloop_schedules"
POLL_SECONDS = 5.0  # how soon the running scheduler sees a change made by another process
DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]

# The process's scheduler context: set by run_scheduler, read by the fired job.
_RUNNER: dict = {}


# ---------------------------------------------------------------- cron


def _dow_names(field: str) -> str:
    """Crontab weekday numbers (0 or 7 = Sunday) as names, since APScheduler 3 counts 0 as
    Monday. Numbers after a `/` are steps and stay numbers."""
    return re.sub(r"(?<![/\d])(\d+)", lambda m: DOW_NAMES[int(m.group(1))]
                  if int(m.group(1)) <= 7 else m.group(1), field)


def parse_cron(cron: str):
    """A CronTrigger (UTC) from five crontab fields, or six with seconds first."""
    from apscheduler.triggers.cron import CronTrigger

    fields = cron.split()
    hint = ("use five cron fields: minute hour day month weekday, e.g. \"0 3 * * 0\" for "
            "Sundays at 03:00 UTC")
    if len(fields) not in (5, 6):
        raise ValueError(f"bad schedule {cron!r}: {len(fields)} fields; {hint}")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, dow = fields
    try:
        if re.search(r"\d", dow) and not re.fullmatch(r"[\d,\-*/]+", dow):
            raise ValueError("weekday mixes numbers and names")
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_dow_names(dow), timezone=timezone.utc)
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"bad schedule {cron!r}: {exc}; {hint}") from None


def describe(cron: str, now: datetime | None = None) -> str:
    trigger = parse_cron(cron)
    now = now or datetime.now(timezone.utc)
    nxt = trigger.get_next_fire_time(None, now)
    return f"cron \"{cron}\" (UTC); next run {nxt:%a %Y-%m-%d %H:%M:%S} UTC"


def fire_slot(trigger, now: datetime) -> datetime:
    """The latest time ≤ now the trigger fires: the slot a fire near `now` belongs to."""
    for window in (timedelta(minutes=2), timedelta(hours=2), timedelta(days=2),
                   timedelta(days=9), timedelta(days=40), timedelta(days=400)):
        t = trigger.get_next_fire_time(None, now - window)
        if t is not None and t <= now:
            while True:
                nxt = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
                if nxt is None or nxt > now:
                    return t
                t = nxt
    return now.replace(microsecond=0)


# ---------------------------------------------------------------- the job store


def _scheduler(settings: Settings):
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    store = Store(settings.database_url)  # makes the SQLite directory, migrates
    jobstore = SQLAlchemyJobStore(engine=store.engine, tablename=JOBSTORE_TABLE)
    return BackgroundScheduler(
        jobstores={"default": jobstore}, timezone=timezone.utc,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 6 * 3600},
    )


class _Editing:
    """A paused scheduler on the job store, for changing schedules from any process."""

    def __init__(self, settings: Settings):
        self.scheduler = _scheduler(settings)

    def __enter__(self):
        self.scheduler.start(paused=True)
        return self.scheduler

    def __exit__(self, *exc):
        self.scheduler.shutdown(wait=False)
        self.scheduler._jobstores["default"].engine.dispose()


def job_id(repo: str) -> str:
    return f"retrain:{repo}"


def set_schedule(settings: Settings, repo: str, cron: str) -> str:
    """Set (or replace) the retraining schedule of `repo`; returns a human description.

    ValueError with a clear message for a bad cron expression."""
    if not repo.strip():
        raise ValueError("name the repository the schedule is for")
    trigger = parse_cron(cron)
    description = describe(cron)
    with _Editing(settings) as sched:
        old = sched.get_job(job_id(repo))
        sched.add_job("training.schedule:scheduled_fire", trigger, id=job_id(repo),
                      name=f"retrain {repo}", kwargs={"repo": repo, "cron": cron},
                      replace_existing=True)
        if old is not None and old.next_run_time is None:  # a paused schedule stays paused
            sched.pause_job(job_id(repo))
            description += " (paused)"
    return f"{repo}: {description}"


def _existing(sched, repo: str):
    job = sched.get_job(job_id(repo))
    if job is None:
        raise ValueError(f"no schedule for {repo}; set one with `codeloop schedule set "
                         f"\"0 3 * * 0\" --repo {repo}`")
    return job


def pause_schedule(settings: Settings, repo: str) -> None:
    with _Editing(settings) as sched:
        _existing(sched, repo)
        sched.pause_job(job_id(repo))


def resume_schedule(settings: Settings, repo: str) -> None:
    with _Editing(settings) as sched:
        _existing(sched, repo)
        sched.resume_job(job_id(repo))


def show_schedules(settings: Settings) -> list[dict]:
    """Every stored schedule: repo, cron, paused, next_run (UTC datetime or None), description."""
    with _Editing(settings) as sched:
        out = []
        for job in sched.get_jobs():
            if not job.id.startswith("retrain:"):
                continue
            cron = job.kwargs.get("cron", "")
            out.append({
                "repo": job.kwargs.get("repo"), "cron": cron, "paused": job.next_run_time is None,
                "next_run": job.next_run_time,
                "description": f"cron \"{cron}\" (UTC)" + (
                    ", paused" if job.next_run_time is None
                    else f", next run {job.next_run_time:%Y-%m-%d %H:%M:%S} UTC"),
            })
        return sorted(out, key=lambda d: d["repo"])


def known_repos(store: Store) -> list[str]:
    with store.session() as s:
        repos = set(s.scalars(select(MergedChange.repo).distinct()))
        repos |= set(s.scalars(select(PullRequest.repo).distinct()))
    return sorted(repos)


def ensure_default_schedules(settings: Settings, store: Store, sched) -> list[str]:
    """Give every known repository without a schedule the default one; returns those added."""
    added = []
    for repo in known_repos(store):
        if sched.get_job(job_id(repo)) is None:
            sched.add_job("training.schedule:scheduled_fire",
                          parse_cron(settings.training.schedule),
                          id=job_id(repo), name=f"retrain {repo}",
                          kwargs={"repo": repo, "cron": settings.training.schedule})
            added.append(repo)
    return added


# ---------------------------------------------------------------- firing and runs


def run_key(repo: str, when: datetime, trigger: str = "schedule") -> str:
    stamp = when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{repo}@{trigger}:{stamp}"


def enqueue_training(store: Store, repo: str, *, key: str, trigger: str,
                     requested_by: str | None,
                     enqueue: Callable[[int], object] | None) -> tuple[int, bool]:
    """Record the run once per key and enqueue it; returns (run id, created)."""
    with store.session() as s:
        run_id, created = insert_or_get(
            s, TrainingRun, {"key": key, "repo": repo, "trigger": trigger,
                             "requested_by": requested_by, "state": "queued",
                             "dataset_card": {}, "losses": [], "timings": {}},
            key=("key",))
    if not created:
        log.info("training run %s for %s exists already (key %s)", run_id, repo, key)
        return run_id, False
    if enqueue is not None:
        enqueue(run_id)
    return run_id, True


def fire(settings: Settings, store: Store, repo: str, when: datetime,
         enqueue: Callable[[int], object] | None) -> tuple[int, bool]:
    """A schedule fired for `repo` at slot `when`: one run per repository and slot."""
    return enqueue_training(store, repo, key=run_key(repo, when), trigger="schedule",
                            requested_by="schedule", enqueue=enqueue)


def scheduled_fire(repo: str, cron: str) -> None:
    """What the stored APScheduler job calls (in the scheduler process)."""
    ctx = _RUNNER.get("ctx")
    if ctx is None:
        log.error("schedule for %s fired outside `run_scheduler`; ignored", repo)
        return
    now = datetime.now(timezone.utc)
    slot = fire_slot(parse_cron(cron), now)
    run_id, created = fire(ctx["settings"], ctx["store"], repo, slot, ctx["enqueue"])
    log.info("schedule fired for %s (slot %s): training run %s%s", repo, slot.isoformat(),
             run_id, "" if created else " (already recorded)")


def retrain_now(settings: Settings, store: Store, repo: str, requested_by: str,
                enqueue: Callable[[int], object] | None = None) -> int:
    """Record a training run for `repo` now and enqueue it; its id. Without `enqueue` the run
    is only recorded, and a worker's recovery sweep enqueues it (`recoverable_runs`)."""
    key = run_key(repo, datetime.now(timezone.utc), "manual") + f"#{time.monotonic_ns()}"
    run_id, _ = enqueue_training(store, repo, key=key, trigger="manual",
                                 requested_by=requested_by, enqueue=enqueue)
    return run_id


class SchedulerRunning(RuntimeError):
    """Another scheduler process holds the lock on this database."""


class _SingleScheduler:
    """One scheduler per database: a PostgreSQL advisory lock, or a file lock next to the
    SQLite database (released when the process ends, however it ends)."""

    KEY = 0x636F64656C6F6F70 & 0x7FFFFFFFFFFFFFFF  # "codeloop"

    def __init__(self, store: Store, settings: Settings):
        self.store, self.settings = store, settings
        self._conn = None
        self._fh = None

    def __enter__(self):
        if self.store.engine.dialect.name == "postgresql":
            from sqlalchemy import text

            self._conn = self.store.engine.connect()
            got = self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                     {"k": self.KEY}).scalar()
            if not got:
                self._conn.close()
                raise SchedulerRunning("another codeloop scheduler is running on this database")
            return self
        import fcntl

        path = self.settings.home / "scheduler.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "w")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise SchedulerRunning(
                f"another codeloop scheduler is running ({path} is locked)") from None
        return self

    def __exit__(self, *exc):
        if self._conn is not None:
            from sqlalchemy import text

            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.KEY})
            self._conn.close()
        if self._fh is not None:
            self._fh.close()


def run_scheduler(settings: Settings, stop: threading.Event,
                  enqueue: Callable[[int], object] | None = None) -> None:
    """The one scheduler process: blocks until `stop` is set. SchedulerRunning when another
    scheduler already runs on this database. `enqueue` puts a run on the queue (the
    composition root passes the queue's training task); without it fired runs are recorded
    and a worker's recovery sweep enqueues them."""
    store = Store(settings.database_url)
    lock = _SingleScheduler(store, settings)
    try:
        lock.__enter__()
    except SchedulerRunning:
        store.close()
        raise
    try:
        _run_scheduler(settings, store, stop, enqueue)
    finally:
        lock.__exit__(None, None, None)
        store.close()


def _run_scheduler(settings: Settings, store: Store, stop: threading.Event,
                   enqueue: Callable[[int], object] | None) -> None:
    _RUNNER["ctx"] = {"settings": settings, "store": store, "enqueue": enqueue}
    sched = _scheduler(settings)
    sched.start()
    try:
        added = ensure_default_schedules(settings, store, sched)
        for repo in added:
            log.info("default schedule for %s: %s", repo, describe(settings.training.schedule))
        last_check = time.monotonic()
        while not stop.wait(POLL_SECONDS):
            sched.wakeup()  # see schedules other processes changed
            if time.monotonic() - last_check > 60:
                ensure_default_schedules(settings, store, sched)
                last_check = time.monotonic()
    finally:
        sched.shutdown(wait=True)
        _RUNNER.pop("ctx", None)


# ---------------------------------------------------------------- durable runs: lease, recovery

BUSY_RETRY_SECONDS = 60.0  # a run whose repository is training elsewhere waits this long
LOST_ENQUEUE_SECONDS = 30  # a run queued longer than this without a worker is enqueued again


def claim_run(store: Store, run_id: int, owner: str, lease_seconds: int) -> str:
    """Take a run: queued, or running under an expired or dead lease (a crashed worker's).

    Returns "claimed"; "done" (finished already); "running" (another live worker has it);
    "waiting" (queued, not before its time); "busy" (another run of the same repository is
    running: it waits, `lease_until` set to when to try again); "lost" (a race lost)."""
    now = utcnow()
    with store.session() as s:
        run = s.get(TrainingRun, run_id)
        if run is None or run.state not in ("queued", "running"):
            return "done"
        if run.state == "queued" and run.lease_until is not None and run.lease_until > now:
            return "waiting"
        stale = run.state == "running" and (
            run.lease_until is None or run.lease_until < now
            or (run.lease_owner != owner and leases.owner_is_dead(run.lease_owner)))
        if run.state == "running" and not stale:
            return "running"
        state, runs = run.state, run.runs
    try:
        with store.session() as s:
            won = s.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id, TrainingRun.state == state,
                       TrainingRun.runs == runs)
                .values(state="running", lease_owner=owner,
                        lease_until=now + timedelta(seconds=lease_seconds), runs=runs + 1,
                        started_at=func.coalesce(TrainingRun.started_at, now))
            ).rowcount
    except IntegrityError:  # the one-running-run-per-repository index
        with store.session() as s:
            s.execute(update(TrainingRun).where(TrainingRun.id == run_id,
                                                TrainingRun.state == "queued")
                      .values(lease_until=now + timedelta(seconds=BUSY_RETRY_SECONDS)))
        return "busy"
    return "claimed" if won == 1 else "lost"


def renew_run(store: Store, run_id: int, owner: str, lease_seconds: int) -> bool:
    with store.session() as s:
        return s.execute(
            update(TrainingRun)
            .where(TrainingRun.id == run_id, TrainingRun.lease_owner == owner,
                   TrainingRun.state == "running")
            .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        ).rowcount == 1


def recoverable_runs(store: Store, *, queued_after: float = LOST_ENQUEUE_SECONDS) -> list[int]:
    """Runs to (re-)enqueue: queued for a while (their enqueue may be lost) and not waiting,
    or running under an expired lease or a lease whose owner process is gone."""
    now = utcnow()
    with store.session() as s:
        rows = s.execute(
            select(TrainingRun.id, TrainingRun.state, TrainingRun.lease_owner,
                   TrainingRun.lease_until, TrainingRun.created_at)
            .where(or_(TrainingRun.state == "queued", TrainingRun.state == "running"))
            .order_by(TrainingRun.id)
        ).all()
    out = []
    for run_id, state, owner, until, created in rows:
        if state == "queued":
            if created < now - timedelta(seconds=queued_after) and (until is None or until < now):
                out.append(run_id)
        elif until is None or until < now or leases.owner_is_dead(owner):
            out.append(run_id)
    return out


def recover_runs(store: Store, enqueue: Callable[[int], object]) -> int:
    """The recovery sweep for training runs (every worker runs it): enqueue what is lost."""
    found = recoverable_runs(store)
    for run_id in found:
        log.info("training run %s: recovering (its worker is gone or its enqueue was lost)",
                 run_id)
        enqueue(run_id)
    return len(found)


# ---------------------------------------------------------------- the training job


def run_training(settings: Settings, store: Store, run_id: int, *, backend: object | None = None,
                 base_model: Path | None = None, max_steps: int | None = None,
                 repo_dirs: dict[str, Path] | None = None, source: object | None = None,
                 owner: str | None = None, replay: Callable | None = None) -> dict:
    """The durable training job: claim under a lease, check there is enough new data, build
    the dataset (from the repository's forge, `source`), train, evaluate against the active
    version, and promote or reject. Returns the run, with "claim" saying how the claim went.

    A run taken over from a crashed worker resumes: the dataset it saved is reused and
    training continues from its newest checkpoint. `replay` (from the composition root,
    bot/replay_jobs.py) lets the gate replay held-out changes through the whole pipeline
    (`training.replay_jobs`)."""
    from training import registry

    owner = owner or leases.worker_id()
    lease = settings.queue.lease_seconds
    got = claim_run(store, run_id, owner, lease)
    if got != "claimed":
        log.info("training run %s: not claimed (%s)", run_id, got)
        return {**registry.run_as_dict(_get(store, run_id)), "claim": got}
    with leases.Heartbeat(lambda: renew_run(store, run_id, owner, lease), lease,
                          f"training run {run_id}"):
        from training.runs import train_claimed

        train_claimed(settings, store, run_id, owner, backend=backend, base_model=base_model,
                      max_steps=max_steps, repo_dirs=repo_dirs, source=source, replay=replay)
    return {**registry.run_as_dict(_get(store, run_id)), "claim": got}


def _get(store: Store, run_id: int) -> TrainingRun:
    with store.session() as s:
        return s.get(TrainingRun, run_id)
