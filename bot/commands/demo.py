"""`codeloop demo`: the whole loop on a sample repository, with the embedded model."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.settings import Settings


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from bot.demo import run_demo

    return run_demo(Path(args.dir))


def register(sub) -> None:
    demo = sub.add_parser("demo", help="the whole loop on a sample repository, embedded model")
    demo.add_argument("--dir", default="demo", help="where the sample repository and data go")
    demo.set_defaults(fn=cmd_demo)
