"""The `codeloop` subcommands, one module per feature; each has `register(sub)`, which adds
its subcommands to the parser (bot/cli.py) with `fn=` the function that runs them.

A command is `fn(args, settings) -> exit status`; what it prints goes through `say` and
`fail` below.
"""

from __future__ import annotations

import sys
from pathlib import Path


def say(text: str = "") -> None:
    print(text, flush=True)


def fail(message: str, code: int = 2) -> int:
    print(f"codeloop: {message}", file=sys.stderr, flush=True)
    return code


def user() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is fine
        return None


def repo_key(repo: str) -> str:
    """A local path is stored as its absolute top level; owner/name stays as it is."""
    path = Path(repo).expanduser()
    if path.exists():
        from bot import git

        return str(git.toplevel(path)) if git.is_repository(path) else str(path.resolve())
    return repo
