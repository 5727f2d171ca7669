"""`codeloop slack socket`: Slack events over Socket Mode (no public URL needed)."""

from __future__ import annotations

import argparse

from bot.commands import fail, say
from bot.settings import Settings


def cmd_slack_socket(args: argparse.Namespace, settings: Settings) -> int:
    """`codeloop slack socket`: Slack events over Socket Mode; `codeloop worker` handles them."""
    from bot.runtime import build_queue, build_runtime
    from bot.slack.app import SlackNotConfigured, run_socket_mode

    for name, value in (("APP_TOKEN", settings.slack.app_token),
                        ("BOT_TOKEN", settings.slack.bot_token)):
        if value is None:
            return fail(f"CODELOOP_SLACK__{name} is not set (see README, Slack)")
    runtime = build_runtime(settings)
    huey = build_queue(settings, lambda: runtime)
    try:
        say("connecting to Slack over Socket Mode (Ctrl-C stops)")
        run_socket_mode(settings, runtime.store, huey.codeloop_handle_delivery)
    except SlackNotConfigured as exc:
        return fail(str(exc))
    return 0


def register(sub) -> None:
    slack = sub.add_parser("slack", help="Slack: Socket Mode (no public URL needed)")
    slack_sub = slack.add_subparsers(dest="slack_command", required=True)
    slack_sub.add_parser(
        "socket", help="receive events over Socket Mode (needs CODELOOP_SLACK__APP_TOKEN); "
        "`codeloop worker` handles them"
    ).set_defaults(fn=cmd_slack_socket)
