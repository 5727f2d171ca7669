"""Workspaces: a private checkout per job, cloned from the repository and reset on resume."""

from __future__ import annotations

import shutil
from pathlib import Path

from bot import git


def prepare(root: Path, job_id: int, clone_url: str, ref: str) -> tuple[Path, str]:
    """A clean checkout of `ref` for this job; returns (directory, commit sha).

    Safe to call again after a crash: an existing checkout is fetched and reset.
    """
    workdir = root / f"job-{job_id}"
    if not (workdir / ".git").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        local = not ("://" in clone_url or clone_url.startswith("git@"))
        args = ["clone", "--quiet", "--no-checkout"] + (["--shared"] if local else [])
        git.git(root, *args, clone_url, workdir.name)
    git.git(workdir, "fetch", "--quiet", "--force", "origin", "+refs/heads/*:refs/remotes/origin/*")
    sha = git.rev(workdir, f"origin/{ref}") or git.rev(workdir, ref)
    if sha is None:
        raise git.GitError(f"{ref} not found in {clone_url}")
    reset(workdir, sha)
    return workdir, sha


def reset(workdir: Path, sha: str) -> None:
    git.git(workdir, "checkout", "--quiet", "--force", "--detach", sha)
    git.git(workdir, "clean", "-fdxq")


def remove(root: Path, job_id: int) -> None:
    shutil.rmtree(root / f"job-{job_id}", ignore_errors=True)
