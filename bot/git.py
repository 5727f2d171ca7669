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


# Every git command the bot runs ignores what a repository could use to run code or steer it:
# hooks (core.hooksPath points nowhere), the file-system monitor, external diff and text
# conversion programs, the `ext::` transport. The workspace's own .git is never visible to
# repository code (docs/architecture.md, "Trust boundaries"); these are the second wall.
HARDENING = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "core.untrackedCache=false",
    "-c", "protocol.ext.allow=never",
    "-c", "diff.noprefix=false",
    "-c", "commit.gpgSign=false",
    "-c", "tag.gpgSign=false",
)

_SAFE_ENV = ("PATH", "HOME", "LANG", "TMPDIR")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k in _SAFE_ENV},
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": BOT_NAME,
        "GIT_AUTHOR_EMAIL": BOT_EMAIL,
        "GIT_COMMITTER_NAME": BOT_NAME,
        "GIT_COMMITTER_EMAIL": BOT_EMAIL,
        **(extra or {}),
    }


def run(
    cwd: Path | str, *args: str, input: str | None = None, env: dict[str, str] | None = None,
    errors: str | None = None,
) -> subprocess.CompletedProcess:
    """One hardened git command; the caller looks at the return code. `errors="replace"`
    reads output that is not UTF-8 (a diff of a Latin-1 file) instead of failing."""
    return subprocess.run(
        ["git", *HARDENING, *args],
        check=False,
        cwd=str(cwd),
        capture_output=True,
        text=True,
        env=_env(env),
        input=input,
        errors=errors,
    )


def git(
    cwd: Path | str, *args: str, check: bool = True, input: str | None = None,
    env: dict[str, str] | None = None, errors: str | None = None,
) -> str:
    proc = run(cwd, *args, input=input, env=env, errors=errors)
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args[:3])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def is_repository(path: Path) -> bool:
    if not path.is_dir():
        return False
    proc = run(path, "rev-parse", "--is-inside-work-tree")
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def toplevel(path: Path) -> Path:
    return Path(git(path, "rev-parse", "--show-toplevel").strip())


def current_branch(path: Path) -> str | None:
    return run(path, "symbolic-ref", "--quiet", "--short", "HEAD").stdout.strip() or None


def rev(path: Path, ref: str) -> str | None:
    return run(path, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").stdout.strip() or None


def dirty_paths(path: Path) -> list[str]:
    """Tracked files with uncommitted changes (untracked files are not counted)."""
    out = git(path, "status", "--porcelain", "--untracked-files=no")
    return [line[3:] for line in out.splitlines() if line.strip()]


def show_file(path: Path, ref: str, name: str) -> str | None:
    proc = run(path, "show", "--no-textconv", f"{ref}:{name}")
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
    return git(path, "diff", "--no-ext-diff", "--no-textconv", "--stat", f"{base}..{head}").rstrip()


def diff(path: Path, base: str, head: str) -> str:
    return git(path, "diff", "--no-ext-diff", "--no-textconv", f"{base}..{head}")


def blob_ids(workdir: Path, paths: list[str]) -> dict[str, str | None]:
    """The blob id each path's current file would get (None: the file is gone)."""
    out: dict[str, str | None] = {}
    present = [p for p in paths if (Path(workdir) / p).is_file()]
    ids = git(workdir, "hash-object", "--no-filters", "--", *present).split() if present else []
    out.update(zip(present, ids))
    out.update({p: None for p in paths if p not in out})
    return out


def verify_commit(workdir: Path, start: str, head: str, expected: dict[str, str | None]) -> None:
    """Raise GitError unless ``head`` is one commit on ``start`` that changes exactly the
    ``expected`` paths to exactly the expected blobs (None: deleted), as regular files."""
    parents = git(workdir, "rev-list", "--parents", "-n", "1", head).split()[1:]
    if parents != [start]:
        raise GitError(f"refusing to push: {head[:10]} is not one commit on {start[:10]}")
    raw = git(workdir, "diff-tree", "-r", "-z", "--no-renames", "--no-ext-diff", start, head)
    fields = raw.split("\0")
    actual: dict[str, tuple[str, str | None]] = {}
    for meta, path in zip(fields[0::2], fields[1::2]):
        if not meta:
            continue
        _, new_mode, _, new_id, status = meta.lstrip(":").split(" ")
        actual[path] = (new_mode, None if status == "D" else new_id)
    problems = []
    for path in sorted(set(actual) | set(expected)):
        mode, blob = actual.get(path, ("", "unchanged"))
        if path not in expected:
            problems.append(f"{path} changed but was not validated")
        elif blob != expected[path]:
            problems.append(f"{path} differs from the validated content")
        elif blob is not None and mode not in ("100644", "100755"):
            problems.append(f"{path} has mode {mode}, not a regular file")
    if problems:
        raise GitError("refusing to push a tree that is not the validated change: "
                       + "; ".join(problems))
