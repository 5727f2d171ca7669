"""The local forge: a git repository on disk. A pull request is a branch plus a row in the store."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bot import git
from bot.forges import ForgeError, OpenedPR, RepoInfo


class LocalForge:
    name = "local"

    def check_repository(self, repo: str) -> RepoInfo:
        path = Path(repo).expanduser()
        if not path.exists():
            raise ForgeError(f"{repo} does not exist")
        if not git.is_repository(path):
            raise ForgeError(f"{repo} is not a git repository (run `git init` and commit first)")
        top = git.toplevel(path)
        branch = git.current_branch(top)
        if branch is None or git.rev(top, "HEAD") is None:
            raise ForgeError(
                f"{top} has no commits on a branch yet: commit your code first "
                "(codeloop branches from committed code)"
            )
        dirty = git.dirty_paths(top)
        if dirty:
            shown = ", ".join(dirty[:5]) + (" …" if len(dirty) > 5 else "")
            raise ForgeError(
                f"{top} has uncommitted changes ({shown}): commit or stash them first, "
                "since codeloop works from committed code"
            )
        return RepoInfo(repo=str(top), clone_url=str(top), default_branch=branch)

    def read_file(self, repo: RepoInfo, ref: str, path: str) -> str | None:
        return git.show_file(Path(repo.repo), ref, path)

    def branch_head(self, repo: RepoInfo, branch: str) -> str | None:
        return git.rev(Path(repo.repo), f"refs/heads/{branch}")

    def push_branch(self, repo: RepoInfo, workdir: Path, branch: str, commit: str = "HEAD") -> None:
        # One ref update: the branch appears whole or not at all.
        git.git(workdir, "push", "--quiet", "origin", f"{commit}:refs/heads/{branch}")

    def open_pull_request(
        self, repo: RepoInfo, *, branch: str, base: str, title: str, body: str, pr_id: int
    ) -> OpenedPR:
        return OpenedPR(number=pr_id, url=f"{repo.repo}#{branch}")

    def merge(self, repo: RepoInfo, *, branch: str, base: str, message: str) -> str:
        path = Path(repo.repo)
        if git.rev(path, f"refs/heads/{branch}") is None:
            raise ForgeError(f"branch {branch} no longer exists in {repo.repo}")
        if git.current_branch(path) == base:
            dirty = git.dirty_paths(path)
            if dirty:
                raise ForgeError(
                    f"cannot merge into the checked-out {base}: uncommitted changes in "
                    f"{', '.join(dirty[:5])}"
                )
            git.git(path, "merge", "--no-ff", "--quiet", "-m", message, branch)
            return git.rev(path, "HEAD") or ""
        # Base not checked out: merge in a scratch clone and push the result.
        with tempfile.TemporaryDirectory(prefix="codeloop-merge-") as tmp:
            git.git(tmp, "clone", "--quiet", "--shared", "--branch", base, str(path), "w")
            work = Path(tmp) / "w"
            git.git(work, "fetch", "--quiet", "origin", f"refs/heads/{branch}:refs/remotes/origin/{branch}")
            git.git(work, "merge", "--no-ff", "--quiet", "-m", message, f"origin/{branch}")
            git.git(work, "push", "--quiet", "origin", f"HEAD:refs/heads/{base}")
            return git.rev(work, "HEAD") or ""
