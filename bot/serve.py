"""Process entry points: web, worker, scheduler, or all three in one process (`serve`).

One machine: `codeloop serve` runs the web server (uvicorn), the huey consumer and the
retraining scheduler in one process. Many machines: `codeloop web` behind a load
balancer, `codeloop worker` on every worker host, one `codeloop scheduler`.

Shutdown on SIGTERM or SIGINT: the web server stops accepting requests, the consumer
stops taking tasks, the scheduler stops, and the process exits without waiting for a
running job. That job is not lost: it stays `running` in the store under this process's
lease, and any worker's recovery sweep resumes it from its last checkpointed stage (at
once on this host, whose pid is gone; elsewhere when the lease lapses).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from bot.settings import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings, store, enqueue_delivery: Callable[[int], object],
              extras: dict | None = None):
    """The web application: every feature that settings enable (bot.web.default_features)."""
    from bot.web import WebContext, create_app, default_features

    ctx = WebContext(settings=settings, store=store, enqueue_delivery=enqueue_delivery,
                     extras=dict(extras or {}))
    return create_app(ctx, default_features(settings))


def drain_deliveries(app, timeout: float = 10.0) -> None:
    """Hand the deliveries answered last to the queue before the process ends (the recovery
    sweep would find them a minute later otherwise)."""
    recorder = getattr(getattr(getattr(app, "state", None), "ctx", None), "recorder", None)
    if recorder is not None:
        recorder.drain(timeout)


def scheduler_runner() -> Callable[..., None] | None:
    """training.schedule.run_scheduler when this build has the learning loop, else None."""
    try:
        from training.schedule import run_scheduler
    except ImportError:
        return None
    return run_scheduler


class Service:
    """The parts of one process, started together and stopped together."""

    def __init__(self, settings: Settings, *, web: bool, worker: bool, scheduler: bool,
                 socket_mode: bool = False):
        self.settings = settings
        self.parts = {"web": web, "worker": worker, "scheduler": scheduler,
                      "slack socket mode": socket_mode}
        self._socket = None
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._consumer = None
        self._delivery_consumer = None
        self.runtime = None

    # -- parts -----------------------------------------------------------------

    def _queue(self):
        from bot.runtime import build_queue, build_runtime

        if self.runtime is None:
            self.runtime = build_runtime(self.settings)
        runtime = self.runtime
        return build_queue(self.settings, lambda: runtime)

    def _start_worker(self, huey) -> None:
        from bot.runtime import recover, recover_training, start_delivery_consumer

        recover(self.runtime, huey.codeloop_run_job)
        recover_training(self.runtime, huey.codeloop_train)
        # Deliveries (clicks, commands, replies, webhooks) on their own queue and threads.
        self._delivery_consumer = start_delivery_consumer(huey)
        consumer = huey.create_consumer(
            workers=self.settings.queue.workers, worker_type="thread", periodic=True,
            check_worker_health=True,
        )
        consumer.start()  # worker and scheduler threads; it also sets signal handlers,
        self._consumer = consumer  # which `run` replaces with this service's own

        def health() -> None:
            while not self.stop.wait(10):
                try:
                    consumer.check_worker_health()
                except Exception:  # noqa: BLE001
                    log.exception("worker health check failed")

        self._spawn("worker-health", health)

    def _start_web(self, huey) -> None:
        import uvicorn

        from bot.store.db import Store

        store = self.runtime.store if self.runtime is not None else Store(
            self.settings.database_url
        )
        app = build_app(self.settings, store, huey.codeloop_handle_delivery)
        config = uvicorn.Config(
            app, host=self.settings.web.host, port=self.settings.web.port, log_config=None,
            access_log=False, lifespan="off", timeout_graceful_shutdown=10,
        )
        self._server = uvicorn.Server(config)
        self._app = app
        # In a thread, uvicorn leaves the signal handlers to this service.
        self._spawn("web", self._server.run)

    def _start_scheduler(self) -> None:
        runner = scheduler_runner()
        if runner is None:
            log.warning("scheduler: retraining is not part of this build (no training package)")
            return
        from bot.runtime import training_enqueue

        enqueue = training_enqueue(self.settings)
        self._spawn("scheduler", lambda: runner(self.settings, self.stop, enqueue))

    def _start_socket_mode(self, huey) -> None:
        """Slack events over a websocket (no public URL): stored and enqueued like HTTP ones."""
        from bot.slack.app import run_socket_mode

        self._socket = run_socket_mode(self.settings, self.runtime.store,
                                       huey.codeloop_handle_delivery, block=False)

    def _spawn(self, name: str, target: Callable[[], object]) -> None:
        def guarded() -> None:
            try:
                target()
            except BaseException:  # noqa: BLE001 - uvicorn exits with SystemExit on bind errors
                log.exception("%s stopped with an error", name)
            finally:
                if not self.stop.is_set():  # a part that ends on its own ends the process
                    log.error("%s stopped; shutting the process down", name)
                    self.stop.set()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        needs_queue = self.parts["web"] or self.parts["worker"] or self.parts["slack socket mode"]
        huey = self._queue() if needs_queue else None
        if self.parts["worker"]:
            self._start_worker(huey)
        if self.parts["scheduler"]:
            self._start_scheduler()
        if self.parts["web"]:
            self._start_web(huey)
        if self.parts["slack socket mode"]:
            self._start_socket_mode(huey)

    def shutdown(self) -> None:
        self.stop.set()
        if self._socket is not None:
            self._socket.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._consumer is not None:
            # Take no new task; a running job keeps its lease and is resumed by recovery.
            self._consumer.stop_flag.set()
        if self._delivery_consumer is not None:
            self._delivery_consumer.stop_flag.set()
        for thread in self._threads:
            if thread.name in ("web", "scheduler"):
                thread.join(timeout=15)
        if getattr(self, "_app", None) is not None:
            drain_deliveries(self._app)
        running = self._running_jobs()
        if running:
            log.info("stopping with job(s) %s running: they resume from their last finished "
                     "stage on the next worker", ", ".join(map(str, running)))

    def _running_jobs(self) -> list[int]:
        if self.runtime is None:
            return []
        from sqlalchemy import select

        from bot.jobs import worker_id
        from bot.store.models import Job

        try:
            with self.runtime.store.session() as s:
                return list(s.scalars(select(Job.id).where(
                    Job.state == "running", Job.lease_owner == worker_id())))
        except Exception:  # noqa: BLE001 - shutting down; the store may be gone
            return []

    def run(self) -> int:
        """Start, wait for SIGTERM/SIGINT (or a part that dies), stop. Main thread only."""
        received: list[int] = []

        def on_signal(signum, _frame) -> None:
            received.append(signum)
            self.stop.set()

        self.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        parts = ", ".join(name for name, on in self.parts.items() if on)
        where = (f" on http://{self.settings.web.host}:{self.settings.web.port}"
                 if self.parts["web"] else "")
        log.info("codeloop started: %s%s", parts, where)
        while not self.stop.wait(0.5):
            pass
        name = signal.Signals(received[0]).name if received else "a part stopped"
        log.info("shutting down (%s)", name)
        self.shutdown()
        log.info("stopped")
        return 0 if received else 1


def run_service(settings: Settings, *, web: bool, worker: bool, scheduler: bool,
                socket_mode: bool = False) -> int:
    return Service(settings, web=web, worker=worker, scheduler=scheduler,
                   socket_mode=socket_mode).run()
