"""`codeloop models | promote | rollback | schedule | train`: the learning loop (training/)."""

from __future__ import annotations

import argparse

from bot.commands import fail, repo_key, say, user
from bot.settings import Settings


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from training import registry

    store = Store(settings.database_url)
    if getattr(args, "models_command", None) == "show":
        version = registry.get_version(store, args.number)
        if version is None:
            return fail(f"no model version {args.number} (see `codeloop models`)")
        say(registry.format_version(version, registry.version_rates(store)))
        return 0
    versions = registry.list_versions(store)
    if not versions:
        say("no model versions yet: the base model serves. Training makes candidates "
            "(`codeloop train --repo PATH` or a schedule).")
        return 0
    rates = registry.version_rates(store)
    say(f"{'#':>4}  {'status':10} {'name':34} {'gate':8} {'PRs':>4} "
        f"{'approved':>8} {'merged':>7}")
    for v in versions:
        gate = (v["metrics"].get("gate") or {}).get("decision", "-")
        r = rates.get(v["name"], {})
        say(f"{v['id']:>4}  {v['status']:10} {v['name']:34} {gate:8} "
            f"{r.get('pull_requests', 0):>4} {r.get('approval_rate', 0):>8.0%} "
            f"{r.get('merge_rate', 0):>7.0%}")
    return 0


def cmd_promote(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from training import registry

    store = Store(settings.database_url)
    try:
        out = registry.promote(settings, store, args.number, actor=user())
    except (registry.RegistryError, RuntimeError) as exc:
        return fail(str(exc))
    prev = ""
    if out["previous_id"]:
        prev = f"; version {out['previous_id']} stays loaded for `codeloop rollback`"
    say(f"version {args.number} ({out['version']}) is active: {out['serving']}{prev}")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from training import registry

    store = Store(settings.database_url)
    try:
        out = registry.rollback(settings, store, actor=user())
    except registry.RegistryError as exc:
        return fail(str(exc))
    say(f"rolled back {out['rolled_back']}; now serving {out['now_serving']}")
    return 0


def cmd_schedule(args: argparse.Namespace, settings: Settings) -> int:
    from training import schedule

    try:
        if args.schedule_command == "set":
            say(schedule.set_schedule(settings, repo_key(args.repo), args.cron))
        elif args.schedule_command == "pause":
            schedule.pause_schedule(settings, repo_key(args.repo))
            say(f"paused retraining of {repo_key(args.repo)}")
        elif args.schedule_command == "resume":
            schedule.resume_schedule(settings, repo_key(args.repo))
            say(f"resumed retraining of {repo_key(args.repo)}")
        else:
            rows = schedule.show_schedules(settings)
            if not rows:
                say("no schedules yet: `codeloop schedule set \"0 3 * * 0\" --repo PATH`")
            for row in rows:
                say(f"{row['repo']}: {row['description']}")
    except ValueError as exc:
        return fail(str(exc))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    """Train now, in this process (the queue's worker runs scheduled runs)."""
    from bot.store.db import Store
    from training import registry, schedule

    from bot.runtime import build_runtime, training_enqueue

    store = Store(settings.database_url)
    repo = repo_key(args.repo)
    run_id = schedule.retrain_now(settings, store, repo, user() or "cli",
                                  enqueue=training_enqueue(settings) if args.queue
                                  else (lambda _id: None))
    if args.queue:
        say(f"training run {run_id} queued; a `codeloop worker` runs it")
        return 0
    runtime = build_runtime(settings)  # the repository's forge: where its history is read
    try:
        run = schedule.run_training(settings, store, run_id, max_steps=args.max_steps,
                                    source=runtime.ports.forge)
    finally:
        runtime.close()
    say(f"training run {run_id}: {run['state']} — {run['reason']}")
    if run["model_version_id"]:
        say(registry.format_version(registry.get_version(store, run["model_version_id"])))
    return 0 if run["state"] in ("succeeded", "skipped") else 1


def register(sub) -> None:
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
