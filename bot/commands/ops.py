"""`codeloop doctor | migrate | stats`: is the set-up right, the schema current, the
work going well."""

from __future__ import annotations

import argparse

from bot.commands import fail, say
from bot.settings import Settings


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from bot.doctor import PARTS, doctor

    only = tuple(p.strip() for p in args.only.split(",") if p.strip()) if args.only else PARTS
    unknown = [p for p in only if p not in PARTS]
    if unknown:
        return fail(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return doctor(settings, write=say, timeout=args.timeout, only=only)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store, StoreError

    try:
        store = Store(settings.database_url)
    except StoreError as exc:
        return fail(str(exc), code=1)
    say(f"database migrated: {store.engine.url.render_as_string(hide_password=True)}")
    return 0


def cmd_stats(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from bot.store.queries import edit_format_stats, job_state_counts

    store = Store(settings.database_url)
    say("jobs by state:")
    for state, count in job_state_counts(store):
        say(f"  {state:10} {count}")
    say("edit formats (well-formed / malformed answers):")
    for row in edit_format_stats(store):
        say(f"  {row.model:30} {row.format:15} {row.well_formed} / {row.malformed}")
    if settings.backend.kind == "openai":
        from bot import vllm

        try:
            load = vllm.server_load(settings.backend.base_url)
        except vllm.VLLMError as exc:
            say(f"model server: {exc}")
        else:
            kv = "" if load.kv_cache_usage is None else f", KV cache {load.kv_cache_usage:.0%} used"
            say(f"model server: {load.running} running, {load.waiting} waiting{kv}")
    return 0


def register(sub) -> None:
    doctor = sub.add_parser("doctor", help="check the set-up: one line per part, what to fix")
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per network check")
    doctor.add_argument("--only", help="comma-separated parts: database,queue,backend,slack,"
                        "github,sandbox,environments (health checks use --only database,queue)")
    doctor.set_defaults(fn=cmd_doctor)
    sub.add_parser("migrate", help="bring the database schema up to date"
                   ).set_defaults(fn=cmd_migrate)
    sub.add_parser("stats", help="job states and edit-format well-formedness").set_defaults(fn=cmd_stats)
