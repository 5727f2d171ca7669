"""The GitHub forge: repositories, branches and pull requests on GitHub, through PyGithub.

Git traffic (fetch, push) goes over HTTPS with the token in an HTTP header given to one git
process (`GitHubClients.git_env`), never in a URL. Workspaces clone from a local mirror of
the repository, so the checkout the sandbox tests run in has no credentials at all.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from bot import git
from bot.forges import ForgeError, OpenedPR, RepoInfo
from bot.forges.github_auth import GitHubClients, GitHubConfigError
from bot.settings import RepoConfigError, parse_repo_config

log = logging.getLogger(__name__)

REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*/(?!\.\.?$)[A-Za-z0-9_.-]+")


def describe(exc: Exception) -> str:
    """A GitHub failure in words for the requester (no headers, no tokens)."""
    from github import GithubException

    if isinstance(exc, GithubException):
        message = exc.data.get("message") if isinstance(exc.data, dict) else None
        return f"GitHub answered {exc.status}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"


class GitHubForge:
    name = "github"

    def __init__(self, clients: GitHubClients, mirrors_dir: Path):
        self.clients = clients
        self.mirrors_dir = mirrors_dir
        self._urls: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _repo(self, full_name: str):
        from github import GithubException, UnknownObjectException

        if not REPO_NAME.fullmatch(full_name or ""):
            raise ForgeError(f"{full_name!r} is not a GitHub repository name (owner/name)")
        try:
            return self.clients.for_repo(full_name).get_repo(full_name)
        except UnknownObjectException as exc:
            raise ForgeError(
                f"{full_name} was not found on GitHub, or codeloop is not installed on it"
            ) from exc
        except GithubException as exc:
            raise ForgeError(f"{full_name}: {describe(exc)}") from exc
        except GitHubConfigError as exc:
            raise ForgeError(str(exc)) from exc

    def _lock(self, full_name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(full_name, threading.Lock())

    def mirror_path(self, full_name: str) -> Path:
        return self.mirrors_dir / (full_name.replace("/", "+") + ".git")

    def check_repository(self, repo: str) -> RepoInfo:
        remote = self._repo(repo)
        self._urls[remote.full_name] = remote.clone_url
        mirror = self.mirror_path(remote.full_name)
        with self._lock(remote.full_name):
            if not (mirror / "HEAD").exists():
                mirror.mkdir(parents=True, exist_ok=True)
                git.git(mirror, "init", "--quiet", "--bare")
            try:
                git.git(
                    mirror,
                    "fetch",
                    "--quiet",
                    "--prune",
                    "--force",
                    remote.clone_url,
                    "+refs/heads/*:refs/heads/*",
                    env=self.clients.git_env(remote.full_name),
                )
                git.git(mirror, "symbolic-ref", "HEAD", f"refs/heads/{remote.default_branch}")
            except git.GitError as exc:
                raise ForgeError(f"could not fetch {remote.full_name}: {exc}") from exc
        return RepoInfo(
            repo=remote.full_name, clone_url=str(mirror), default_branch=remote.default_branch
        )

    def pull_facts(self, repo: str, number: int) -> dict | None:
        """GitHub's record of pull request `number`, for the dataset builder: `merged`,
        `merged_at` (GitHub's time), `base_ref`, `merge_sha`, `base_sha`; None if not found."""
        from github import GithubException, UnknownObjectException

        try:
            pull = self._repo(repo).get_pull(number)
        except UnknownObjectException:
            return None
        except GithubException as exc:
            raise ForgeError(f"pull request #{number} of {repo}: {describe(exc)}") from exc
        return {
            "merged": bool(pull.merged),
            "merged_at": pull.merged_at,
            "base_ref": pull.base.ref,
            "merge_sha": pull.merge_commit_sha,
            "base_sha": pull.base.sha,
        }

    def read_file(self, repo: RepoInfo, ref: str, path: str) -> str | None:
        from github import GithubException, UnknownObjectException

        try:
            content = self._repo(repo.repo).get_contents(path, ref=ref)
        except UnknownObjectException:
            return None
        except GithubException as exc:
            raise ForgeError(f"reading {path} from {repo.repo}: {describe(exc)}") from exc
        if isinstance(content, list):
            return None  # a directory
        return content.decoded_content.decode("utf-8", errors="replace")

    def branch_head(self, repo: RepoInfo, branch: str) -> str | None:
        from github import GithubException

        try:
            return self._repo(repo.repo).get_branch(branch).commit.sha
        except GithubException as exc:
            if exc.status == 404:
                return None
            raise ForgeError(f"branch {branch} of {repo.repo}: {describe(exc)}") from exc

    def push_branch(self, repo: RepoInfo, workdir: Path, branch: str, commit: str = "HEAD") -> None:
        url = self._urls.get(repo.repo) or self._repo(repo.repo).clone_url
        try:
            git.git(
                workdir,
                "push",
                "--quiet",
                url,
                f"{commit}:refs/heads/{branch}",
                env=self.clients.git_env(repo.repo),
            )
        except git.GitError as exc:
            raise ForgeError(f"could not push {branch} to {repo.repo}: {exc}") from exc

    def open_pull_request(
        self, repo: RepoInfo, *, branch: str, base: str, title: str, body: str, pr_id: int
    ) -> OpenedPR:
        """Open the pull request, or update the open one for this branch (idempotent)."""
        from github import GithubException

        remote = self._repo(repo.repo)
        owner = repo.repo.split("/")[0]
        try:
            existing = list(remote.get_pulls(state="open", head=f"{owner}:{branch}"))
            if existing:
                pull = existing[0]
                pull.edit(title=title, body=body)
            else:
                pull = remote.create_pull(base=base, head=branch, title=title, body=body)
            labels = self._labels(repo)
            if labels:
                pull.add_to_labels(*labels)
        except GithubException as exc:
            raise ForgeError(f"opening the pull request on {repo.repo}: {describe(exc)}") from exc
        return OpenedPR(number=pull.number, url=pull.html_url)

    def update_pull_request(self, repo: str, number: int, *, body: str) -> None:
        from github import GithubException

        try:
            self._repo(repo).get_pull(number).edit(body=body)
        except GithubException as exc:
            raise ForgeError(f"updating #{number} on {repo}: {describe(exc)}") from exc

    def _labels(self, repo: RepoInfo) -> list[str]:
        try:
            return parse_repo_config(
                self.read_file(repo, repo.default_branch, ".codeloop.yml")
            ).labels
        except RepoConfigError:
            return []

    def merge(self, repo: RepoInfo, *, branch: str, base: str, message: str) -> str:
        raise ForgeError("pull requests on GitHub are merged on GitHub (the merge button)")
