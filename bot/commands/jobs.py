"""`codeloop run | prs | show | review | merge`: the terminal chat port and the local
forge's review commands."""

from __future__ import annotations

import argparse
import sys
import time

from bot import jobs, verdict
from bot.commands import fail, say, user
from bot.forges import ForgeError
from bot.settings import Settings


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import TerminalNotifier, build_queue, build_runtime, execute
    from bot.store.queries import job_and_request

    requirement = args.requirement
    if requirement == "-":
        requirement = sys.stdin.read()
    runtime = build_runtime(settings, notifier=TerminalNotifier())
    try:
        info = runtime.ports.forge.check_repository(args.repo)
    except ForgeError as exc:
        return fail(str(exc))
    try:
        sub = jobs.submit(
            runtime.store, source="cli", repo=info.repo, requirement=requirement,
            max_bytes=settings.pipeline.max_requirement_bytes, requester=user(),
        )
    except jobs.BadRequest as exc:
        return fail(str(exc))
    job, request = job_and_request(runtime.store, sub.job_id, sub.request_id)
    state, result, error = job.state, dict(job.result), job.error
    if request.truncated:
        say(f"note: the requirement was over {settings.pipeline.max_requirement_bytes:,} "
            "bytes and was truncated")
    if not sub.created:
        say(f"request #{sub.request_id} was made before (job {sub.job_id}, {state})")
    if args.queue:
        if state == "queued":
            build_queue(settings, lambda: runtime).codeloop_run_job(sub.job_id)
        say(f"queued as job {sub.job_id}; a `codeloop worker` runs it")
        return 0
    if state in ("queued", "running"):
        say(f"job {sub.job_id}: {info.repo}")
        outcome = execute(runtime, sub.job_id)
        while outcome.state == "deferred":  # the model server is down: wait here, then resume
            say(f"job {sub.job_id}: retrying in {outcome.retry_in:.0f} s (Ctrl-C leaves it "
                "queued for a `codeloop worker`)")
            time.sleep(outcome.retry_in)
            outcome = execute(runtime, sub.job_id)
        if outcome.state == "skipped":
            say(f"job {sub.job_id} is running in another process")
            return 1
        state, result, error = outcome.state, outcome.result, outcome.error
    if state != "succeeded":
        return fail(f"job {sub.job_id} {state}: {error}", code=1)
    _print_result(result)
    return 0


def _print_result(result: dict) -> None:
    validation = result.get("validation", {})
    say()
    say(f"pull request #{result['number']}  branch {result['branch']}  "
        f"(revision {result['revision']}, model {result['model']})")
    say(result.get("diff_stat", ""))
    say(f"validation: {'passed' if validation.get('ok') else 'failed'} — {verdict.line(validation)}")


def cmd_prs(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from bot.store.queries import pull_requests

    rows = pull_requests(Store(settings.database_url))
    if not rows:
        say("no pull requests yet: `codeloop run \"requirement\" --repo PATH` makes one")
        return 0
    say(f"{'#':>4}  {'state':8} {'revs':>4}  {'branch':45} title")
    for pr in rows:
        say(f"{pr.number or pr.id:>4}  {pr.state:8} {len(pr.revisions):>4}  {pr.branch:45} {pr.title}")
    return 0


def _local_pr_id(store, number: int) -> int | None:
    from bot.store.queries import local_pull_request

    pr = local_pull_request(store, number)
    return pr.id if pr else None


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    from bot.store.db import Store
    from bot.store.queries import local_pull_request

    pr = local_pull_request(Store(settings.database_url), args.number)
    if pr is None:
        return fail(f"no pull request #{args.number} (see `codeloop prs`)")
    say(f"#{pr.number} {pr.title}")
    say(f"state: {pr.state}   branch: {pr.branch} → {pr.base_branch}   repo: {pr.repo}")
    say(f"model: {pr.model_version}")
    say()
    say(pr.body)
    say()
    for rev in pr.revisions:
        say(f"revision {rev.number} ({rev.trigger}) {rev.commit_sha[:12]}: "
            f"{verdict.line(rev.validation)}")
    if pr.signals:
        say("\nreview signals:")
        for sig in pr.signals:
            extra = f": {sig.body}" if sig.body else ""
            say(f"  {sig.created_at:%Y-%m-%d %H:%M} {sig.kind} by {sig.author}{extra}")
    if args.diff and pr.revisions:
        say()
        for rev in pr.revisions:
            say(rev.diff)
    return 0


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import TerminalNotifier, build_runtime, execute
    from feedback.signals import SignalError, record_local_review

    runtime = build_runtime(settings, notifier=TerminalNotifier())
    pr_id = _local_pr_id(runtime.store, args.number)
    if pr_id is None:
        return fail(f"no pull request #{args.number} (see `codeloop prs`)")
    if args.approve:
        kind, body = "approved", args.comment
    elif args.request_changes is not None:
        kind, body = "changes_requested", args.request_changes
    else:
        kind, body = "commented", args.comment
    try:
        outcome = record_local_review(runtime.store, pr_id, kind=kind, body=body, author=user())
    except SignalError as exc:
        return fail(str(exc))
    say(f"recorded: {kind} on #{args.number}")
    wanted = outcome.revision
    if wanted is not None:  # the review asks for a revision: this edge starts it
        job_id, _ = jobs.submit_revision(
            runtime.store, request_id=wanted.request_id, pull_request_id=wanted.pull_request_id,
            feedback=wanted.feedback, key=wanted.key)
        say(f"revising #{args.number} (job {job_id})")
        result = execute(runtime, job_id)
        if result.state != "succeeded":
            return fail(f"revision job {result.job_id} {result.state}: {result.error}", code=1)
        _print_result(result.result)
    return 0


def cmd_merge(args: argparse.Namespace, settings: Settings) -> int:
    from bot.runtime import build_runtime
    from feedback.signals import SignalError, close_local, merge_local

    runtime = build_runtime(settings)
    pr_id = _local_pr_id(runtime.store, args.number)
    if pr_id is None:
        return fail(f"no pull request #{args.number} (see `codeloop prs`)")
    try:
        if args.close:
            close_local(runtime.store, pr_id, author=user())
            say(f"closed #{args.number} without merging")
        else:
            sha = merge_local(runtime.store, runtime.ports.forge, pr_id, author=user())
            say(f"merged #{args.number} as {sha[:12]}")
    except (SignalError, ForgeError) as exc:
        return fail(str(exc))
    return 0


def register(sub) -> None:
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
