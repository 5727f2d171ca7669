"""`codeloop` command line: the parser and `main`; each feature's subcommands live in
bot/commands/ and register themselves here (`register(sub)`)."""

from __future__ import annotations

import argparse
import logging
import sys

from bot.commands import demo, fail, github, jobs, learning, ops, service, slack, vllm
from bot.settings import Settings

# In the order `codeloop --help` lists them.
FEATURES = (jobs, service, ops, slack, demo, github, vllm, learning)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codeloop", description="Requirement in, pull request out.")
    sub = p.add_subparsers(dest="command", required=True)
    for feature in FEATURES:
        feature.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings()
    except Exception as exc:  # noqa: BLE001 - bad settings: one clear line
        return fail(f"invalid settings: {exc}")
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
        return fail("interrupted; a queued job resumes with `codeloop worker`", code=130)


if __name__ == "__main__":
    sys.exit(main())
