"""Thin, explicit git plumbing used by workspaces and forges (subprocess, no shell)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

BOT_NAME = "codeloop"
BOT_EMAIL = "codeloop@localhost"


class GitError(RuntimeError):
    """A git command failed; the message carries git's own words."""


def git(
    cwd: Path | str, *args: str, check: bool = True, input: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    full_env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")},
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": BOT_NAME,
        "GIT_AUTHOR_EMAIL": BOT_EMAIL,
        "GIT_COMMITTER_NAME": BOT_NAME,
        "GIT_COMMITTER_EMAIL": BOT_EMAIL,
        **(env or {}),
    }
    proc = subprocess.run(
        ["git", *args],
        cwd=str(cwd),
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
    )
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args[:3])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def is_repository(path: Path) -> bool:
    if not path.is_dir():
        return False
    proc = subprocess.run(
        ["git", "rev-parse", "--is-inside-work-tree"], cwd=path, capture_output=True, text=True
    )
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def toplevel(path: Path) -> Path:
    return Path(git(path, "rev-parse", "--show-toplevel").strip())


def current_branch(path: Path) -> str | None:
    proc = subprocess.run(
        ["git", "symbolic-ref", "--quiet", "--short", "HEAD"], cwd=path, capture_output=True, text=True
    )
    return proc.stdout.strip() or None


def rev(path: Path, ref: str) -> str | None:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        cwd=path,
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


def dirty_paths(path: Path) -> list[str]:
    """Tracked files with uncommitted changes (untracked files are not counted)."""
    out = git(path, "status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines() if line.strip()]


def show_file(path: Path, ref: str, name: str) -> str | None:
    proc = subprocess.run(
        ["git", "show", f"{ref}:{name}"], cwd=path, capture_output=True, text=True
    )
    return proc.stdout if proc.returncode == 0 else None


def slugify(text: str, limit: int = 40) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > limit:
            break
        slug = candidate
    return slug or "change"


def diff_stat(path: Path, base: str, head: str) -> str:
    return git(path, "diff", "--stat", f"{base}..{head}").rstrip()


def diff(path: Path, base: str, head: str) -> str:
    return git(path, "diff", f"{base}..{head}")
