"""`codeloop worker | serve | web | scheduler`: the long-running services."""

from __future__ import annotations

import argparse
import logging
import sys

from bot.commands import fail, say
from bot.settings import Settings


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import (
        build_queue, build_runtime, recover, recover_training, start_delivery_consumer,
    )

    problem = sandbox_problem(settings)
    if problem:
        return fail(problem, code=1)
    runtime = build_runtime(settings)
    huey = build_queue(settings, lambda: runtime)
    _report_model_server(settings)
    # Jobs and training runs whose worker died (on this host) resume at once; others when
    # their lease ends.
    recover(runtime, huey.codeloop_run_job)
    logging.getLogger("huey").setLevel(logging.WARNING)
    deliveries_consumer = start_delivery_consumer(huey)  # clicks and replies never wait on jobs
    recover_training(runtime, huey.codeloop_train)
    consumer = huey.create_consumer(
        workers=settings.queue.workers, worker_type="thread", periodic=True, check_worker_health=True
    )
    try:
        consumer.run()
    finally:
        deliveries_consumer.stop()
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """serve: web + worker + scheduler in one process; web / scheduler: one part each."""
    from bot.serve import run_service, scheduler_runner

    if args.command == "scheduler" and scheduler_runner() is None:
        return fail("retraining is not part of this build (no training package); "
                    "there is nothing to schedule", code=1)
    parts = {"serve": (True, True, True), "web": (True, False, False),
             "scheduler": (False, False, True)}[args.command]
    web, worker, scheduler = parts
    problem = sandbox_problem(settings) if worker else None
    if problem:
        return fail(problem, code=1)
    socket_mode = getattr(args, "socket_mode", False)
    if socket_mode:
        for name, value in (("APP_TOKEN", settings.slack.app_token),
                            ("BOT_TOKEN", settings.slack.bot_token)):
            if value is None:
                return fail(f"--socket-mode needs CODELOOP_SLACK__{name} (see README, Slack)")
    return run_service(settings, web=web, worker=worker, scheduler=scheduler,
                       socket_mode=socket_mode)


def sandbox_problem(settings: Settings) -> str | None:
    """Why this worker must not take jobs (no working sandbox), or None; warns when unsafe."""
    from bot.sandbox import probe

    if settings.sandbox.isolation == "none":
        print("worker: WARNING: CODELOOP_SANDBOX__ISOLATION=none — repository tests run "
              "unconfined on this host", file=sys.stderr, flush=True)
        return None
    found = probe(settings.sandbox)
    if found.ok:
        return None
    return (f"this worker takes no jobs: the test sandbox does not work here ({found.detail}). "
            "`codeloop doctor --only sandbox` shows the details")


def _report_model_server(settings: Settings) -> None:
    """At worker start: what the model server serves, and a warning if our model is not there.

    Not fatal: the server may come up after the worker (jobs wait for it on the queue).
    """
    if settings.backend.kind != "openai":
        say(f"worker: embedded model {settings.backend.model} (loaded on the first job)")
        return
    from inference.backends.openai_backend import OpenAIBackend

    backend = OpenAIBackend(settings.backend.model_copy(update={"max_retries": 0}))
    try:
        served = backend.list_models()
    except Exception as exc:  # noqa: BLE001 - reported, and jobs wait on the queue
        say(f"worker: warning: {exc}; jobs wait on the queue until it answers")
        return
    finally:
        backend.close()
    say(f"worker: {backend.base_url} serves {', '.join(served) or 'nothing'}")
    if settings.backend.model not in served:
        say(f"worker: warning: the configured model {settings.backend.model!r} is not served "
            "there; set CODELOOP_BACKEND__MODEL to one of the names above")


def register(sub) -> None:
    sub.add_parser("worker", help="run queued jobs (huey consumer)").set_defaults(fn=cmd_worker)
    serve = sub.add_parser("serve", help="web + worker + scheduler in one process (one machine)")
    serve.add_argument("--socket-mode", action="store_true",
                       help="also receive Slack events over Socket Mode (no public URL needed; "
                       "needs CODELOOP_SLACK__APP_TOKEN)")
    serve.set_defaults(fn=cmd_serve)
    sub.add_parser("web", help="the web server: webhooks, Slack events, metrics, dashboard"
                   ).set_defaults(fn=cmd_serve)
    sub.add_parser("scheduler", help="the retraining scheduler (run one)"
                   ).set_defaults(fn=cmd_serve)
