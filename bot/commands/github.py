"""`codeloop github check OWNER/NAME`: GitHub App set-up."""

from __future__ import annotations

import argparse

from bot.commands import say
from bot.settings import Settings


def cmd_github_check(args: argparse.Namespace, settings: Settings) -> int:
    from bot.github.check import check

    ok, lines = check(settings, args.repo)
    for line in lines:
        say(line)
    return 0 if ok else 2


def register(sub) -> None:
    github = sub.add_parser("github", help="GitHub App set-up")
    github_sub = github.add_subparsers(dest="github_command", required=True)
    gcheck = github_sub.add_parser("check", help="check credentials, access and .codeloop.yml")
    gcheck.add_argument("repo", help="owner/name")
    gcheck.set_defaults(fn=cmd_github_check)
