"""Where the dataset reads a repository's history: a local git repository or the forge's
copy (for GitHub the mirror the forge keeps, fetched up to date before a build).

`locate` finds the local git directory and default branch; `Checkout` is a scratch clone for
reading files at any commit; `confirm_with_forge` stores the forge's own record of merged
pull requests (`merged_at`, base branch); `import_git_history` turns a repository's commits
into merged changes (for history that predates codeloop, and bench/learning.py). Git runs
through bot/git.py (hardened: no hooks, no external programs).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update

from bot import git
from bot.settings import RepoConfigError, Settings, parse_repo_config
from bot.store.db import Store
from bot.store.models import MergedChange

log = logging.getLogger(__name__)

class HistorySource(Protocol):
    """Where a repository's history is read from: a forge (bot/forges), passed in by the
    composition root. `check_repository(repo)` returns something with `clone_url` (a local git
    directory, brought up to date) and `default_branch`. A forge may also offer
    `pull_facts(repo, number) -> dict | None` with the forge's own record of a pull request:
    `merged` (bool), `merged_at` (datetime), `base_ref`, `merge_sha`, `base_sha`."""

    def check_repository(self, repo: str) -> Any: ...


@dataclass(frozen=True)
class Located:
    """The local git directory a repository's history is read from, and its default branch."""

    dir: Path | None
    default_branch: str | None


class Checkout:
    """A scratch clone of one repository for reading files at any commit (shared objects)."""

    def __init__(self, repo_dir: Path):
        self.src = Path(repo_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix="codeloop-dataset-"))
        self.dir = self.tmp / "w"
        git.git(self.tmp, "clone", "--quiet", "--shared", "--no-checkout", str(self.src), "w")

    def has(self, sha: str | None) -> bool:
        if not sha:
            return False
        return git.run(self.dir, "cat-file", "-e", f"{sha}^{{commit}}").returncode == 0

    def checkout(self, sha: str) -> None:
        git.git(self.dir, "checkout", "--quiet", "--force", "--detach", sha)
        git.git(self.dir, "clean", "-fdxq")

    def rev(self, ref: str) -> str | None:
        return git.rev(self.dir, ref)

    def apply(self, diff: str) -> bool:
        return git.run(self.dir, "apply", "--whitespace=nowarn", "-", input=diff).returncode == 0

    def read(self, path: str) -> str | None:
        try:
            data = (self.dir / path).read_bytes()
        except OSError:
            return None
        return data.decode("utf-8", errors="replace")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def resolve_checkout(repo: str, settings: Settings,
                     repo_dirs: dict[str, Path] | None) -> Path | None:
    """A local git repository for `repo`: given, the path itself (local forge), or None."""
    if repo_dirs and repo in repo_dirs:
        return Path(repo_dirs[repo])
    path = Path(repo)
    if path.is_dir() and (path / ".git").exists():
        return path
    return None


def head_branch(repo_dir: Path) -> str | None:
    return git.current_branch(repo_dir)


def locate(repo: str, settings: Settings, repo_dirs: dict[str, Path] | None = None,
           source: HistorySource | None = None) -> Located:
    """Where to read `repo` from: a directory given in `repo_dirs`, else the forge's copy
    (fetched up to date now: for GitHub the mirror the forge keeps), else the path itself."""
    if repo_dirs and repo in repo_dirs:
        d = Path(repo_dirs[repo])
        return Located(d, head_branch(d))
    if source is not None:
        try:
            info = source.check_repository(repo)
        except Exception as exc:  # noqa: BLE001 - the forge failed; fall back to a local path
            log.warning("dataset for %s: the forge could not provide the repository: %s",
                        repo, exc)
        else:
            d = Path(info.clone_url)
            if d.is_dir():
                return Located(d, info.default_branch or head_branch(d))
    d = resolve_checkout(repo, settings, None)
    return Located(d, head_branch(d) if d else None)


def repo_config_at(repo_dir: Path | None, branch: str | None):
    """The trusted `.codeloop.yml`: the one on the default branch (defaults if unreadable)."""
    if repo_dir is None:
        return parse_repo_config(None)
    ref = f"refs/heads/{branch}" if branch else "HEAD"
    text = git.run(repo_dir, "show", f"{ref}:.codeloop.yml").stdout or None
    try:
        return parse_repo_config(text)
    except RepoConfigError:
        return parse_repo_config(None)


def training_branches(default_branch: str | None, config) -> list[str]:
    """Branches whose merges are training material: the default branch, the configured
    `base_branch` (where codeloop's pull requests go) and `training_branches`."""
    out = [b for b in [default_branch, config.base_branch, *config.training_branches] if b]
    return list(dict.fromkeys(out))


def naive_utc(when: Any) -> datetime | None:
    if when is None:
        return None
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when


def confirm_with_forge(store: Store, repo: str, source: HistorySource | None) -> dict[str, int]:
    """Ask the forge once about each merged change of `repo` it has not confirmed (no
    `base_ref` yet) and store its answer: the branch merged into, GitHub's `merged_at`, and
    the merge and base commits where they were missing. Returns counts for the card."""
    facts_of = getattr(source, "pull_facts", None)
    counts: Counter = Counter()
    if facts_of is None:
        return dict(counts)
    with store.session() as s:
        rows = s.execute(select(MergedChange.id, MergedChange.external_id).where(
            MergedChange.repo == repo, MergedChange.base_ref.is_(None),
            MergedChange.forge == getattr(source, "name", None))).all()
    for row_id, external_id in rows:
        if not str(external_id).isdigit():
            continue
        try:
            facts = facts_of(repo, int(external_id))
        except Exception as exc:  # noqa: BLE001 - asked again at the next build
            log.warning("dataset for %s: pull request #%s not confirmed: %s", repo, external_id,
                        exc)
            counts["unconfirmed"] += 1
            continue
        if not facts:
            counts["unconfirmed"] += 1
            continue
        values: dict = {"base_ref": facts.get("base_ref") or ""}
        if not facts.get("merged"):
            values["base_ref"] = ""  # confirmed: not merged (never training material)
            counts["not_merged"] += 1
        else:
            counts["confirmed"] += 1
            if facts.get("merged_at"):
                values["merged_at"] = naive_utc(facts["merged_at"])
        with store.session() as s:
            row = s.get(MergedChange, row_id)
            if facts.get("merge_sha") and not row.merge_sha:
                values["merge_sha"] = facts["merge_sha"]
            if facts.get("base_sha") and not row.base_sha:
                values["base_sha"] = facts["base_sha"]
            s.execute(update(MergedChange).where(MergedChange.id == row_id).values(**values))
    return dict(counts)


def is_ancestor(repo_dir: Path, sha: str, branches: list[str]) -> bool | None:
    """Whether `sha` is on one of `branches` in `repo_dir` (None: cannot tell)."""
    if git.run(repo_dir, "cat-file", "-e", f"{sha}^{{commit}}").returncode != 0:
        return None
    known = False
    for branch in branches:
        ref = f"refs/heads/{branch}"
        if git.run(repo_dir, "rev-parse", "--verify", "--quiet", ref).returncode != 0:
            continue
        known = True
        if git.run(repo_dir, "merge-base", "--is-ancestor", sha, ref).returncode == 0:
            return True
    return False if known else None


def import_git_history(store: Store, repo_dir: Path, *, repo: str | None = None,
                       limit: int | None = None, forge: str = "git") -> int:
    """Each first-parent commit of `repo_dir` as a merged change (message = requirement).

    For a repository whose history predates codeloop, and for bench/learning.py. Commits
    already imported are skipped; returns how many were added."""
    repo_dir = Path(repo_dir)
    repo = repo or str(repo_dir)
    sep = "\x1e"
    out = git.git(repo_dir, "log", "--first-parent", "--reverse", "--no-merges",
                  f"--format=%H%x1f%P%x1f%an%x1f%ct%x1f%s%x1f%b{sep}", errors="replace")
    rows = [r.strip("\n").split("\x1f") for r in out.split(sep) if r.strip()]
    rows = [r for r in rows if len(r) >= 6 and r[1].strip()]  # the root commit has no change
    if limit is not None:
        rows = rows[-limit:]
    with store.session() as s:
        have = set(s.scalars(select(MergedChange.external_id).where(
            MergedChange.repo == repo, MergedChange.forge == forge)))
    added = 0
    for sha, parents, author, stamp, subject, body in rows:
        if sha in have:
            continue
        parent = parents.split()[0]
        diff = git.git(repo_dir, "diff", "--no-color", "--binary", parent, sha, errors="replace")
        with store.session() as s:
            s.add(MergedChange(
                forge=forge, repo=repo, external_id=sha, title=subject[:1000], body=body.strip(),
                diff=diff, base_sha=parent, merge_sha=sha, author=author, by_bot=False,
                merged_at=datetime.utcfromtimestamp(int(stamp)),
            ))
        added += 1
    return added
