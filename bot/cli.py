"""`codeloop` command line: the terminal chat port and the local forge's review commands."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from bot import jobs, verdict
from bot.forges import ForgeError
from bot.settings import Settings


def _settings() -> Settings:
    return Settings()


def _print(text: str = "") -> None:
    print(text, flush=True)


def _fail(message: str, code: int = 2) -> int:
    print(f"codeloop: {message}", file=sys.stderr, flush=True)
    return code


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import TerminalNotifier, build_queue, build_runtime, execute

    requirement = args.requirement
    if requirement == "-":
        requirement = sys.stdin.read()
    runtime = build_runtime(settings, notifier=TerminalNotifier())
    try:
        info = runtime.ports.forge.check_repository(args.repo)
    except ForgeError as exc:
        return _fail(str(exc))
    try:
        sub = jobs.submit(
            runtime.store, source="cli", repo=info.repo, requirement=requirement,
            max_bytes=settings.pipeline.max_requirement_bytes, requester=_user(),
        )
    except jobs.BadRequest as exc:
        return _fail(str(exc))
    with runtime.store.session() as s:
        from bot.store.models import Job, Request

        job = s.get(Job, sub.job_id)
        truncated = s.get(Request, sub.request_id).truncated
        state, result, error = job.state, dict(job.result), job.error
    if truncated:
        _print(f"note: the requirement was over {settings.pipeline.max_requirement_bytes:,} "
               "bytes and was truncated")
    if not sub.created:
        _print(f"request #{sub.request_id} was made before (job {sub.job_id}, {state})")
    if args.queue:
        if state == "queued":
            build_queue(settings, lambda: runtime).codeloop_run_job(sub.job_id)
        _print(f"queued as job {sub.job_id}; a `codeloop worker` runs it")
        return 0
    if state in ("queued", "running"):
        _print(f"job {sub.job_id}: {info.repo}")
        outcome = execute(runtime, sub.job_id)
        while outcome.state == "deferred":  # the model server is down: wait here, then resume
            _print(f"job {sub.job_id}: retrying in {outcome.retry_in:.0f} s (Ctrl-C leaves it "
                   "queued for a `codeloop worker`)")
            time.sleep(outcome.retry_in)
            outcome = execute(runtime, sub.job_id)
        if outcome.state == "skipped":
            _print(f"job {sub.job_id} is running in another process")
            return 1
        state, result, error = outcome.state, outcome.result, outcome.error
    if state != "succeeded":
        return _fail(f"job {sub.job_id} {state}: {error}", code=1)
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    validation = result.get("validation", {})
    _print()
    _print(f"pull request #{result['number']}  branch {result['branch']}  "
           f"(revision {result['revision']}, model {result['model']})")
    _print(result.get("diff_stat", ""))
    _print(f"validation: {'passed' if validation.get('ok') else 'failed'} — {verdict.line(validation)}")


def _user() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is fine
        return None


def cmd_prs(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from bot.store.models import PullRequest

    store = Store(settings.database_url)
    with store.session() as s:
        rows = s.scalars(select(PullRequest).order_by(PullRequest.id)).all()
        if not rows:
            _print("no pull requests yet: `codeloop run \"requirement\" --repo PATH` makes one")
            return 0
        _print(f"{'#':>4}  {'state':8} {'revs':>4}  {'branch':45} title")
        for pr in rows:
            _print(f"{pr.number or pr.id:>4}  {pr.state:8} {len(pr.revisions):>4}  {pr.branch:45} {pr.title}")
    return 0


def _get_pr(store, number: int):
    from bot.store.models import PullRequest

    with store.session() as s:
        pr = s.scalar(select(PullRequest).where(PullRequest.number == number, PullRequest.forge == "local"))
        return pr.id if pr else None


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from bot.store.models import PullRequest

    store = Store(settings.database_url)
    pr_id = _get_pr(store, args.number)
    if pr_id is None:
        return _fail(f"no pull request #{args.number} (see `codeloop prs`)")
    with store.session() as s:
        pr = s.get(PullRequest, pr_id)
        _print(f"#{pr.number} {pr.title}")
        _print(f"state: {pr.state}   branch: {pr.branch} → {pr.base_branch}   repo: {pr.repo}")
        _print(f"model: {pr.model_version}")
        _print()
        _print(pr.body)
        _print()
        for rev in pr.revisions:
            _print(f"revision {rev.number} ({rev.trigger}) {rev.commit_sha[:12]}: "
                   f"{verdict.line(rev.validation)}")
        if pr.signals:
            _print("\nreview signals:")
            for sig in pr.signals:
                extra = f": {sig.body}" if sig.body else ""
                _print(f"  {sig.created_at:%Y-%m-%d %H:%M} {sig.kind} by {sig.author}{extra}")
        if args.diff and pr.revisions:
            _print()
            for rev in pr.revisions:
                _print(rev.diff)
    return 0


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import TerminalNotifier, build_runtime, execute
    from feedback.signals import SignalError, record_local_review

    runtime = build_runtime(settings, notifier=TerminalNotifier())
    pr_id = _get_pr(runtime.store, args.number)
    if pr_id is None:
        return _fail(f"no pull request #{args.number} (see `codeloop prs`)")
    if args.approve:
        kind, body = "approved", args.comment
    elif args.request_changes is not None:
        kind, body = "changes_requested", args.request_changes
    else:
        kind, body = "commented", args.comment
    try:
        outcome = record_local_review(runtime.store, pr_id, kind=kind, body=body, author=_user())
    except SignalError as exc:
        return _fail(str(exc))
    _print(f"recorded: {kind} on #{args.number}")
    wanted = outcome.revision
    if wanted is not None:  # the review asks for a revision: this edge starts it
        job_id, _ = jobs.submit_revision(
            runtime.store, request_id=wanted.request_id, pull_request_id=wanted.pull_request_id,
            feedback=wanted.feedback, key=wanted.key)
        _print(f"revising #{args.number} (job {job_id})")
        result = execute(runtime, job_id)
        if result.state != "succeeded":
            return _fail(f"revision job {result.job_id} {result.state}: {result.error}", code=1)
        _print_result(result.result)
    return 0


def cmd_merge(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import build_runtime
    from feedback.signals import SignalError, close_local, merge_local

    runtime = build_runtime(settings)
    pr_id = _get_pr(runtime.store, args.number)
    if pr_id is None:
        return _fail(f"no pull request #{args.number} (see `codeloop prs`)")
    try:
        if args.close:
            close_local(runtime.store, pr_id, author=_user())
            _print(f"closed #{args.number} without merging")
        else:
            sha = merge_local(runtime.store, runtime.ports.forge, pr_id, author=_user())
            _print(f"merged #{args.number} as {sha[:12]}")
    except (SignalError, ForgeError) as exc:
        return _fail(str(exc))
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import (
        build_queue, build_runtime, recover, recover_training, start_delivery_consumer,
    )

    problem = sandbox_problem(settings)
    if problem:
        return _fail(problem, code=1)
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
        return _fail("retraining is not part of this build (no training package); "
                     "there is nothing to schedule", code=1)
    parts = {"serve": (True, True, True), "web": (True, False, False),
             "scheduler": (False, False, True)}[args.command]
    web, worker, scheduler = parts
    problem = sandbox_problem(settings) if worker else None
    if problem:
        return _fail(problem, code=1)
    socket_mode = getattr(args, "socket_mode", False)
    if socket_mode:
        for name, value in (("APP_TOKEN", settings.slack.app_token),
                            ("BOT_TOKEN", settings.slack.bot_token)):
            if value is None:
                return _fail(f"--socket-mode needs CODELOOP_SLACK__{name} (see README, Slack)")
    return run_service(settings, web=web, worker=worker, scheduler=scheduler,
                       socket_mode=socket_mode)


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from bot.doctor import PARTS, doctor

    only = tuple(p.strip() for p in args.only.split(",") if p.strip()) if args.only else PARTS
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        return _fail(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return doctor(settings, write=_print, timeout=args.timeout, only=only)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store, StoreError

    try:
        store = Store(settings.database_url)
    except StoreError as exc:
        return _fail(str(exc), code=1)
    _print(f"database migrated: {store.engine.url.render_as_string(hide_password=True)}")
    return 0


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
        _print(f"worker: embedded model {settings.backend.model} (loaded on the first job)")
        return
    from inference.backends.openai_backend import OpenAIBackend

    backend = OpenAIBackend(settings.backend.model_copy(update={"max_retries": 0}))
    try:
        served = backend.list_models()
    except Exception as exc:  # noqa: BLE001 - reported, and jobs wait on the queue
        _print(f"worker: warning: {exc}; jobs wait on the queue until it answers")
        return
    finally:
        backend.close()
    _print(f"worker: {backend.base_url} serves {', '.join(served) or 'nothing'}")
    if settings.backend.model not in served:
        _print(f"worker: warning: the configured model {settings.backend.model!r} is not served "
               "there; set CODELOOP_BACKEND__MODEL to one of the names above")


def cmd_slack_socket(args: argparse.Namespace, settings: Settings) -> int:
    """`codeloop slack socket`: Slack events over Socket Mode; `codeloop worker` handles them."""
    from bot.runtime import build_queue, build_runtime
    from bot.slack.app import SlackNotConfigured, run_socket_mode

    for name, value in (("APP_TOKEN", settings.slack.app_token),
                        ("BOT_TOKEN", settings.slack.bot_token)):
        if value is None:
            return _fail(f"CODELOOP_SLACK__{name} is not set (see README, Slack)")
    runtime = build_runtime(settings)
    huey = build_queue(settings, lambda: runtime)
    try:
        _print("connecting to Slack over Socket Mode (Ctrl-C stops)")
        run_socket_mode(settings, runtime.store, huey.codeloop_handle_delivery)
    except SlackNotConfigured as exc:
        return _fail(str(exc))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from bot.demo import run_demo

    return run_demo(Path(args.dir))


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from bot.store.models import EditFormatStat, Job

    store = Store(settings.database_url)
    with store.session() as s:
        _print("jobs by state:")
        for state, count in s.execute(select(Job.state, func.count()).group_by(Job.state)):
            _print(f"  {state:10} {count}")
        _print("edit formats (well-formed / malformed answers):")
        for row in s.scalars(select(EditFormatStat)):
            _print(f"  {row.model:30} {row.format:15} {row.well_formed} / {row.malformed}")
    if settings.backend.kind == "openai":
        from bot import vllm

        try:
            load = vllm.server_load(settings.backend.base_url)
        except vllm.VLLMError as exc:
            _print(f"model server: {exc}")
        else:
            kv = "" if load.kv_cache_usage is None else f", KV cache {load.kv_cache_usage:.0%} used"
            _print(f"model server: {load.running} running, {load.waiting} waiting{kv}")
    return 0


def cmd_vllm(args: argparse.Namespace, settings: Settings) -> int:
    """`codeloop vllm serve`: vLLM on the embedded model in the foreground, until Ctrl-C."""
    from bot import vllm

    try:
        venv = Path(args.venv) if args.venv else None
        if args.install:
            vllm.ensure_venv(venv)
        proc = vllm.serve(
            settings, model_dir=Path(args.model_dir) if args.model_dir else None,
            port=args.port, host=args.host, venv=venv,
        )
    except vllm.VLLMError as exc:
        return _fail(str(exc))
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base_url = f"http://{host}:{args.port}/v1"
    _print(f"starting vLLM (log: {proc.log_path})")

    def _terminated(signum, frame):  # `kill` stops the server too, as Ctrl-C does
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        seconds = vllm.wait_healthy(base_url, args.timeout, process=proc)
        _print(f"vLLM is healthy after {seconds:.0f} s at {base_url}")
        _print(f"serving: {', '.join(vllm.served_models(base_url))}")
        _print(f"use it with CODELOOP_BACKEND__KIND=openai CODELOOP_BACKEND__BASE_URL={base_url}")
        code = proc.wait()
        if code:
            return _fail(f"vLLM exited with status {code}; see {proc.log_path}", code=1)
        return 0
    except vllm.VLLMError as exc:
        return _fail(str(exc), code=1)
    except KeyboardInterrupt:
        return 0
    finally:
        vllm.stop(proc)


def cmd_github_check(args: argparse.Namespace, settings: Settings) -> int:
    from bot.github.check import check

    ok, lines = check(settings, args.repo)
    for line in lines:
        _print(line)
    return 0 if ok else 2


# ---------------------------------------------------------------- learning loop (training/)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from training import registry

    store = Store(settings.database_url)
    if getattr(args, "models_command", None) == "show":
        version = registry.get_version(store, args.number)
        if version is None:
            return _fail(f"no model version {args.number} (see `codeloop models`)")
        _print(registry.format_version(version, registry.version_rates(store)))
        return 0
    versions = registry.list_versions(store)
    if not versions:
        _print("no model versions yet: the base model serves. Training makes candidates "
               "(`codeloop train --repo PATH` or a schedule).")
        return 0
    rates = registry.version_rates(store)
    _print(f"{'#':>4}  {'status':10} {'name':34} {'gate':8} {'PRs':>4} "
           f"{'approved':>8} {'merged':>7}")
    for v in versions:
        gate = (v["metrics"].get("gate") or {}).get("decision", "-")
        r = rates.get(v["name"], {})
        _print(f"{v['id']:>4}  {v['status']:10} {v['name']:34} {gate:8} "
               f"{r.get('pull_requests', 0):>4} {r.get('approval_rate', 0):>8.0%} "
               f"{r.get('merge_rate', 0):>7.0%}")
    return 0


def cmd_promote(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from training import registry

    store = Store(settings.database_url)
    try:
        out = registry.promote(settings, store, args.number, actor=_user())
    except (registry.RegistryError, RuntimeError) as exc:
        return _fail(str(exc))
    prev = ""
    if out["previous_id"]:
        prev = f"; version {out['previous_id']} stays loaded for `codeloop rollback`"
    _print(f"version {args.number} ({out['version']}) is active: {out['serving']}{prev}")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from training import registry

    store = Store(settings.database_url)
    try:
        out = registry.rollback(settings, store, actor=_user())
    except registry.RegistryError as exc:
        return _fail(str(exc))
    _print(f"rolled back {out['rolled_back']}; now serving {out['now_serving']}")
    return 0


def cmd_schedule(args: argparse.Namespace, settings: Settings) -> int:
    from training import schedule

    try:
        if args.schedule_command == "set":
            _print(schedule.set_schedule(settings, _repo_key(args.repo), args.cron))
        elif args.schedule_command == "pause":
            schedule.pause_schedule(settings, _repo_key(args.repo))
            _print(f"paused retraining of {_repo_key(args.repo)}")
        elif args.schedule_command == "resume":
            schedule.resume_schedule(settings, _repo_key(args.repo))
            _print(f"resumed retraining of {_repo_key(args.repo)}")
        else:
            rows = schedule.show_schedules(settings)
            if not rows:
                _print("no schedules yet: `codeloop schedule set \"0 3 * * 0\" --repo PATH`")
            for row in rows:
                _print(f"{row['repo']}: {row['description']}")
    except ValueError as exc:
        return _fail(str(exc))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train now, in this process (the queue's worker runs scheduled runs)."""
    from bot.store.db import Store
    from training import registry, schedule

    from bot.runtime import build_runtime, training_enqueue

    store = Store(settings.database_url)
    repo = _repo_key(args.repo)
    run_id = schedule.retrain_now(settings, store, repo, _user() or "cli",
                                  enqueue=training_enqueue(settings) if args.queue
                                  else (lambda _id: None))
    if args.queue:
        _print(f"training run {run_id} queued; a `codeloop worker` runs it")
        return 0
    runtime = build_runtime(settings)  # the repository's forge: where its history is read
    try:
        run = schedule.run_training(settings, store, run_id, max_steps=args.max_steps,
                                    source=runtime.ports.forge)
    finally:
        runtime.close()
    _print(f"training run {run_id}: {run['state']} — {run['reason']}")
    if run["model_version_id"]:
        _print(registry.format_version(registry.get_version(store, run["model_version_id"])))
    return 0 if run["state"] in ("succeeded", "skipped") else 1


def _repo_key(repo: str) -> str:
    """A local path is stored as its absolute top level; owner/name stays as it is."""
    path = Path(repo).expanduser()
    if path.exists():
        from bot import git

        return str(git.toplevel(path)) if git.is_repository(path) else str(path.resolve())
    return repo


# ---------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codeloop", description="Requirement in, pull request out.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="turn a requirement into a pull request on a local repository")
    run.add_argument("requirement", help="what the change should do ('-' reads standard input)")
    run.add_argument("--repo", default=".", help="the git repository (default: here)")
    run.add_argument("--queue", action="store_true", help="enqueue for `codeloop worker` and return")
    run.set_defaults(fn=cmd_run)

    sub.add_parser("prs", help="list pull requests").set_defaults(fn=cmd_prs)

    show = sub.add_parser("show", help="show a pull request")
    show.add_argument("number", type=int)
    show.add_argument("--diff", action="store_true", help="print each revision's diff")
    show.set_defaults(fn=cmd_show)

    review = sub.add_parser("review", help="review a pull request")
    review.add_argument("number", type=int)
    group = review.add_mutually_exclusive_group(required=True)
    group.add_argument("--approve", action="store_true")
    group.add_argument("--request-changes", metavar="COMMENT", help="the bot revises the same PR")
    group.add_argument("--comment", metavar="COMMENT")
    review.set_defaults(fn=cmd_review)

    merge = sub.add_parser("merge", help="merge a pull request into its base branch")
    merge.add_argument("number", type=int)
    merge.add_argument("--close", action="store_true", help="close without merging instead")
    merge.set_defaults(fn=cmd_merge)

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
    doctor = sub.add_parser("doctor", help="check the set-up: one line per part, what to fix")
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per network check")
    doctor.add_argument("--only", help="comma-separated parts: database,queue,backend,slack,"
                        "github,sandbox,environments (health checks use --only database,queue)")
    doctor.set_defaults(fn=cmd_doctor)
    sub.add_parser("migrate", help="bring the database schema up to date"
                   ).set_defaults(fn=cmd_migrate)
    sub.add_parser("stats", help="job states and edit-format well-formedness").set_defaults(fn=cmd_stats)

    slack = sub.add_parser("slack", help="Slack: Socket Mode (no public URL needed)")
    slack_sub = slack.add_subparsers(dest="slack_command", required=True)
    slack_sub.add_parser(
        "socket", help="receive events over Socket Mode (needs CODELOOP_SLACK__APP_TOKEN); "
        "`codeloop worker` handles them"
    ).set_defaults(fn=cmd_slack_socket)

    demo = sub.add_parser("demo", help="the whole loop on a sample repository, embedded model")
    demo.add_argument("--dir", default="demo", help="where the sample repository and data go")
    demo.set_defaults(fn=cmd_demo)

    github = sub.add_parser("github", help="GitHub App set-up")
    github_sub = github.add_subparsers(dest="github_command", required=True)
    gcheck = github_sub.add_parser("check", help="check credentials, access and .codeloop.yml")
    gcheck.add_argument("repo", help="owner/name")
    gcheck.set_defaults(fn=cmd_github_check)

    vllm = sub.add_parser("vllm", help="vLLM's OpenAI-compatible server on this machine")
    vllm_sub = vllm.add_subparsers(dest="vllm_command", required=True)
    vserve = vllm_sub.add_parser("serve", help="serve the model with runtime LoRA, in the foreground")
    vserve.add_argument("--port", type=int, default=8000)
    vserve.add_argument("--host", default="127.0.0.1")
    vserve.add_argument("--model-dir", help="a safetensors model directory (default: the embedded model)")
    vserve.add_argument("--venv", help="the vLLM environment (default: $CODELOOP_VLLM_VENV or "
                        "~/.cache/codeloop/vllm-venv)")
    vserve.add_argument("--install", action="store_true", help="create the vLLM environment first")
    vserve.add_argument("--timeout", type=float, default=900, help="seconds to wait for health")
    vserve.set_defaults(fn=cmd_vllm)

    models = sub.add_parser("models", help="model versions, their gate reports and rates")
    models.set_defaults(fn=cmd_models)
    models_sub = models.add_subparsers(dest="models_command")
    mshow = models_sub.add_parser("show", help="one version with its evaluation report")
    mshow.add_argument("number", type=int)
    mshow.set_defaults(fn=cmd_models)
    promote = sub.add_parser("promote", help="serve model version N (the previous stays loaded)")
    promote.add_argument("number", type=int)
    promote.set_defaults(fn=cmd_promote)
    rollback = sub.add_parser("rollback", help="serve the previous model version again")
    rollback.set_defaults(fn=cmd_rollback)

    sched = sub.add_parser("schedule", help="the retraining schedule of a repository")
    sched_sub = sched.add_subparsers(dest="schedule_command", required=True)
    sset = sched_sub.add_parser("set", help="set the schedule (cron, UTC)")
    sset.add_argument("cron", help='five cron fields, e.g. "0 3 * * 0" (Sundays at 03:00 UTC)')
    sset.add_argument("--repo", default=".", help="the repository (default: here)")
    sched_sub.add_parser("show", help="every schedule and its next run")
    for name in ("pause", "resume"):
        one = sched_sub.add_parser(name, help=f"{name} a repository's retraining")
        one.add_argument("--repo", default=".", help="the repository (default: here)")
    sched.set_defaults(fn=cmd_schedule)

    trainp = sub.add_parser("train", help="build the dataset, train, evaluate, maybe promote")
    trainp.add_argument("--repo", default=".", help="the repository (default: here)")
    trainp.add_argument("--queue", action="store_true", help="enqueue for a `codeloop worker`")
    trainp.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    trainp.set_defaults(fn=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = _settings()
    except Exception as exc:  # noqa: BLE001 - bad settings: one clear line
        return _fail(f"invalid settings: {exc}")
    from bot import logs

    # Services log JSON lines by default (auto: text on a terminal); commands people type
    # log readable text. Either way ids ride along and secret values are masked.
    services = ("serve", "web", "worker", "scheduler")
    logs.configure(
        settings.secret_values(), level=settings.log_level,
        fmt=settings.ops.log_format if args.command in services else "text", stream=sys.stderr,
    )
    if args.command in ("run", "review", "demo"):
        logging.getLogger("bot").setLevel(logging.WARNING)
    try:
        return args.fn(args, settings)
    except KeyboardInterrupt:
        return _fail("interrupted; a queued job resumes with `codeloop worker`", code=130)


if __name__ == "__main__":
    sys.exit(main())
