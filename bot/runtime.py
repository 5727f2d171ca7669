"""Composition root: settings → store, forge, backend, queue, notifier. Nothing else wires."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bot import deliveries, jobs, logs
from bot.deliveries import Handler
from bot.forges import Forge
from bot.forges.local import LocalForge
from bot.pipeline import (
    BackendUnavailable,
    JobCancelled,
    JobFailed,
    Ports,
    run_job,
    stage_label,
)
from bot.ports import Backend, Notifier
from bot.settings import Settings
from bot.store.db import Store
from bot.store.models import Job
from training.registry import serving_model

log = logging.getLogger(__name__)

def build_backend(
    settings: Settings, progress: Callable[[str], None] | None = None, store: Store | None = None
) -> Backend:
    """The configured backend. Heavy imports happen here, not at import time.

    With a store, the embedded backend also loads the adapters of the serving model
    versions (active and previous, training/registry) so jobs can use them by name."""
    if settings.backend.kind == "openai":
        from inference.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings.backend)
    from inference.backends.embedded import EMBEDDED_MODEL_NAME, ensure_converted
    from inference.backends.transformers_backend import TransformersBackend

    path, _ = ensure_converted(settings.embedded.cache_dir, progress=progress)
    backend = TransformersBackend(
        path,
        model_name=EMBEDDED_MODEL_NAME,
        adapter_path=settings.embedded.adapter_path,
        context_tokens=settings.backend.context_tokens,
        threads=settings.embedded.threads,
    )
    if store is not None:
        from pathlib import Path

        from training.registry import serving_versions

        for version in serving_versions(store):
            if version["adapter_path"] and Path(version["adapter_path"]).is_dir():
                backend.load_adapter(version["name"], Path(version["adapter_path"]))
    return backend


class LazyBackend:
    """Loads the backend on first use, once per process (thread-safe)."""

    def __init__(self, factory: Callable[[], Backend]):
        self._factory = factory
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        self.load_seconds: float | None = None

    def __call__(self) -> Backend:
        with self._lock:
            if self._backend is None:
                started = time.perf_counter()
                self._backend = self._factory()
                self.load_seconds = time.perf_counter() - started
            return self._backend


class LogNotifier:
    """Progress into the log (workers); chat adapters send the same events elsewhere."""

    def stage(self, job_id: int, stage: str, detail: str = "") -> None:
        log.info("job %s: %s", job_id, detail or stage_label(stage))

    def finished(self, job_id: int, text: str, ok: bool) -> None:
        (log.info if ok else log.warning)("job %s: %s", job_id, text)


@dataclass
class TerminalNotifier:
    """Progress for `codeloop run`: one line per stage with elapsed time."""

    stream: object = field(default_factory=lambda: sys.stdout)
    started: float = field(default_factory=time.perf_counter)

    def stage(self, job_id: int, stage: str, detail: str = "") -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:6.1f}s] job {job_id}: {detail or stage_label(stage)}",
              file=self.stream, flush=True)

    def finished(self, job_id: int, text: str, ok: bool) -> None:
        elapsed = time.perf_counter() - self.started
        mark = "done" if ok else "FAILED"
        print(f"[{elapsed:6.1f}s] job {job_id} {mark}: {text}", file=self.stream, flush=True)


@dataclass
class Runtime:
    settings: Settings
    store: Store
    ports: Ports
    backend: LazyBackend
    # source ("github", "slack") → handler of a stored delivery (bot.deliveries)
    delivery_handlers: dict[str, Handler] = field(default_factory=dict)
    # Puts a job on the queue; set by build_queue (without a queue, the recovery sweep runs it).
    enqueue_job: Callable[[int], object] | None = None
    # Puts a training run on the queue; set by build_queue (without it, the sweep enqueues).
    enqueue_training: Callable[[int], object] | None = None

    def enqueue(self, job_id: int) -> None:
        if self.enqueue_job is not None:
            self.enqueue_job(job_id)

    def enqueue_train(self, run_id: int) -> None:
        if self.enqueue_training is not None:
            self.enqueue_training(run_id)

    def close(self) -> None:
        self.store.close()


def build_runtime(
    settings: Settings,
    notifier: Notifier | None = None,
    backend: Backend | None = None,
    forge: Forge | None = None,
) -> Runtime:
    """Wire the ports from settings; tests pass their own adapters for any port."""
    from bot.notify import RoutingNotifier

    store = Store(settings.database_url)
    lazy = LazyBackend((lambda: backend) if backend is not None else (lambda: build_backend(settings, store=store)))
    # Each chat/forge feature adds its notifier (by request source) and delivery handler here.
    by_source: dict[str, Notifier] = {}
    handlers: dict[str, Handler] = {}
    github_clients = None
    if forge is None and settings.forge.kind == "github":
        from bot.forges.github import GitHubForge
        from bot.forges.github_auth import GitHubClients

        github_clients = GitHubClients(settings.github)
        forge = GitHubForge(github_clients, settings.home / "mirrors")
    ports = Ports(
        settings=settings,
        store=store,
        forge=forge or LocalForge(),
        backend=lazy,
        notifier=notifier or RoutingNotifier(store, by_source, default=LogNotifier(),
                                              secrets=settings.secret_values()),
        # The promoted model version (or, for canary jobs, the one before it), else the default.
        serving_model=lambda job_id: serving_model(settings, store, job_id),
    )
    runtime = Runtime(
        settings=settings, store=store, ports=ports, backend=lazy, delivery_handlers=handlers
    )
    if settings.slack.bot_token is not None:
        from bot.slack.app import web_client
        from bot.slack.handler import SlackHandler
        from bot.slack.notifier import SlackNotifier

        slack = web_client(settings)
        by_source["slack"] = SlackNotifier(store, slack,
                                           interval=settings.slack.update_interval_seconds)
        handlers["slack"] = SlackHandler(settings, store, slack, ports.forge, runtime.enqueue)
        handlers["slack"].enqueue_training = runtime.enqueue_train

    from bot import github

    if settings.forge.kind == "github" and github.configured(settings):
        github.install(settings, store, by_source, handlers, enqueue_job=runtime.enqueue,
                       clients=github_clients)
    return runtime


@dataclass(frozen=True)
class Outcome:
    job_id: int
    state: str  # succeeded | failed | cancelled | skipped | deferred
    result: dict
    error: str | None = None
    retry_in: float | None = None  # deferred: seconds until the job may run again


def backend_wait(settings: Settings, runs: int) -> float:
    """Delay before run `runs + 1` of a job waiting for the model server: doubling, capped."""
    return min(settings.queue.backend_wait_seconds * 2 ** max(0, runs - 1), 600.0)


def _defer_or_fail(runtime: Runtime, job_id: int, owner: str, exc: BackendUnavailable) -> Outcome:
    settings, store, notifier = runtime.settings, runtime.store, runtime.ports.notifier
    with store.session() as s:
        runs = s.get(Job, job_id).runs
    if runs >= settings.queue.max_runs:
        message = f"the model server stayed unavailable after {runs} tries: {exc}"
        jobs.finish(store, job_id, owner, state="failed", error=message, result={})
        notifier.finished(job_id, message, ok=False)
        return Outcome(job_id, "failed", {}, message)
    delay = backend_wait(settings, runs)
    note = f"waiting for the model server ({exc}); try {runs + 1} of {settings.queue.max_runs} in {delay:.0f} s"
    log.warning("job %s: %s", job_id, note)
    jobs.defer(store, job_id, owner, delay_seconds=delay, note=note)
    notifier.stage(job_id, "waiting", note)
    return Outcome(job_id, "deferred", {}, note, retry_in=delay)


def execute(runtime: Runtime, job_id: int, owner: str | None = None) -> Outcome:
    """Claim a job, run it under a lease with a heartbeat, and record how it ended.

    This is the one boundary for a job: every failure ends here, logged with the job id,
    stored on the job, and told to the requester through the notifier.
    """
    with logs.bound(**_job_ids(runtime.store, job_id)):
        return _execute(runtime, job_id, owner)


def _job_ids(store: Store, job_id: int) -> dict:
    """request, job and delivery ids of a job, for its log lines (bot.logs)."""
    from sqlalchemy import select

    from bot.store.models import Delivery, Job

    with store.session() as s:
        request_id = s.scalar(select(Job.request_id).where(Job.id == job_id))
        delivery = None
        if request_id is not None:
            delivery = s.scalar(
                select(Delivery.delivery_id).where(Delivery.request_id == request_id).limit(1)
            )
    return {"job_id": job_id, "request_id": request_id, "delivery_id": delivery}


def _execute(runtime: Runtime, job_id: int, owner: str | None) -> Outcome:
    settings, store, notifier = runtime.settings, runtime.store, runtime.ports.notifier
    owner = owner or jobs.worker_id()
    lease = settings.queue.lease_seconds
    if not jobs.claim(store, job_id, owner, lease):
        log.info("job %s: not claimable (done, cancelled or running elsewhere)", job_id)
        return Outcome(job_id, "skipped", {})
    with jobs.Heartbeat(store, job_id, owner, lease):
        try:
            result = run_job(job_id, runtime.ports)
        except JobCancelled:
            notifier.finished(job_id, "cancelled", ok=False)
            return Outcome(job_id, "cancelled", {}, "cancelled")
        except BackendUnavailable as exc:
            return _defer_or_fail(runtime, job_id, owner, exc)
        except JobFailed as exc:
            jobs.finish(store, job_id, owner, state="failed", error=str(exc), result={})
            notifier.finished(job_id, str(exc), ok=False)
            return Outcome(job_id, "failed", {}, str(exc))
        except Exception as exc:  # noqa: BLE001 - the job boundary
            log.exception("job %s: unexpected error", job_id)
            message = f"internal error ({type(exc).__name__}): {exc}"
            jobs.finish(store, job_id, owner, state="failed", error=message, result={})
            notifier.finished(job_id, message, ok=False)
            return Outcome(job_id, "failed", {}, message)
    jobs.finish(store, job_id, owner, state="succeeded", error=None, result=result)
    notifier.finished(job_id, f"pull request #{result['number']} on {result['branch']}", ok=True)
    return Outcome(job_id, "succeeded", result)


# ---------------------------------------------------------------- the queue (huey)


# Threads of the deliveries consumer in each worker process (see build_queue).
DELIVERY_WORKERS = 2


def _huey(settings: Settings, name: str):
    from huey import RedisHuey, SqliteHuey

    url = settings.queue.url
    if url and url.startswith("redis"):
        return RedisHuey(name, url=url)
    path = settings.home / "queue.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name, filename=str(path))


def build_queue(settings: Settings, runtime_factory: Callable[[], Runtime]):
    """codeloop's queues, with its tasks registered. SQLite by default, Redis by URL.

    Two queues, so that answering people never waits behind generation:
    - `codeloop` (the returned huey): jobs (`codeloop.run_job`, minutes each), training
      runs and the periodic recovery sweep, consumed by `queue.workers` threads;
    - `codeloop-deliveries` (`huey.codeloop_deliveries`): stored deliveries from GitHub and
      Slack (`codeloop.handle_delivery`): button clicks, slash commands, replies, "Queued
      as", status, help and refusals. A delivery handler never generates (it decides, writes
      rows, answers and enqueues a job), so each takes milliseconds to a few API calls; its
      own consumer (`start_delivery_consumer`, DELIVERY_WORKERS threads in every worker
      process) means a Cancel click is handled while the job it cancels is still running.
    """
    from huey import crontab

    huey = _huey(settings, "codeloop")
    interactive = _huey(settings, "codeloop-deliveries")

    state: dict = {}
    lock = threading.Lock()

    def runtime() -> Runtime:
        with lock:
            if "runtime" not in state:
                state["runtime"] = runtime_factory()
                state["runtime"].enqueue_job = run_job_task
                state["runtime"].enqueue_training = train_task
            return state["runtime"]

    @huey.task(name="codeloop.run_job")
    def run_job_task(job_id: int) -> str:
        outcome = execute(runtime(), job_id)
        if outcome.state == "deferred":
            run_job_task.schedule(args=(job_id,), delay=outcome.retry_in)
        return outcome.state

    @interactive.task(name="codeloop.handle_delivery")
    def handle_delivery_task(delivery_pk: int) -> str:
        rt = runtime()
        return deliveries.handle(rt.store, delivery_pk, rt.delivery_handlers)

    @huey.periodic_task(crontab(minute="*"), name="codeloop.recover")
    def recover_task() -> int:
        rt = runtime()
        lost = deliveries.pending(rt.store)
        for pk in lost:
            log.info("delivery row %s: re-enqueued (its first enqueue was lost)", pk)
            handle_delivery_task(pk)
        return recover(rt, run_job_task) + recover_training(rt, train_task) + len(lost)

    @huey.task(name="codeloop.train")
    def train_task(run_id: int) -> str:
        from bot.replay_jobs import gate_runners
        from training.schedule import BUSY_RETRY_SECONDS, run_training

        rt = runtime()
        loaded = rt.backend._backend  # promote into the embedded backend if this worker has it
        run = run_training(rt.settings, rt.store, run_id, backend=loaded, source=rt.ports.forge,
                           replay=gate_runners(rt.settings))
        if run.get("claim") == "busy":  # its repository is training elsewhere: wait a turn
            train_task.schedule(args=(run_id,), delay=BUSY_RETRY_SECONDS)
        return run["state"]

    huey.codeloop_run_job = run_job_task  # type: ignore[attr-defined]
    huey.codeloop_train = train_task  # type: ignore[attr-defined]
    huey.codeloop_handle_delivery = handle_delivery_task  # type: ignore[attr-defined]
    huey.codeloop_runtime = runtime  # type: ignore[attr-defined]
    huey.codeloop_deliveries = interactive  # type: ignore[attr-defined]
    return huey


def start_delivery_consumer(huey, workers: int = DELIVERY_WORKERS):
    """Start the consumer of the deliveries queue in this process (threads); returns it.

    Call `.stop()` on it at shutdown. It runs no periodic task (the jobs consumer does)."""
    consumer = huey.codeloop_deliveries.create_consumer(
        workers=workers, worker_type="thread", periodic=False, check_worker_health=False
    )
    consumer.start()
    return consumer


def recover_training(runtime: Runtime, enqueue: Callable[[int], object]) -> int:
    """Re-enqueue training runs that lost their worker or their enqueue (none without the
    learning loop in this build)."""
    try:
        from training.schedule import recover_runs
    except ImportError:
        return 0
    return recover_runs(runtime.store, enqueue)


def training_enqueue(settings: Settings) -> Callable[[int], object]:
    """What puts a training run on the queue, for the edges that record runs (Slack, the
    dashboard, the CLI, the scheduler)."""
    huey = build_queue(settings, lambda: build_runtime(settings))
    return huey.codeloop_train


def recover(runtime: Runtime, enqueue: Callable[[int], object]) -> int:
    """Re-enqueue jobs that lost their worker (or their enqueue); claims dedupe the rest."""
    found = jobs.recoverable_jobs(runtime.store, runtime.settings.queue.lease_seconds)
    for job_id in found:
        log.info("job %s: recovering (its worker is gone or its lease expired)", job_id)
        enqueue(job_id)
    return len(found)
