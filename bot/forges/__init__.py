"""Forges: where branches are pushed and pull requests live (local git repository, GitHub)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class ForgeError(RuntimeError):
    """The forge refused or failed; the message is meant for the requester."""


@dataclass(frozen=True)
class RepoInfo:
    repo: str  # canonical name: an absolute path (local) or owner/name (GitHub)
    clone_url: str
    default_branch: str


@dataclass(frozen=True)
class OpenedPR:
    number: int | None
    url: str


class Forge(Protocol):
    name: str

    def check_repository(self, repo: str) -> RepoInfo:
        """Resolve and check a repository; raise ForgeError with a clear message."""

    def read_file(self, repo: RepoInfo, ref: str, path: str) -> str | None: ...

    def push_branch(self, repo: RepoInfo, workdir: Path, branch: str, commit: str = "HEAD") -> None:
        """Push `commit` of the workspace to `branch` (create or fast-forward)."""

    def branch_head(self, repo: RepoInfo, branch: str) -> str | None: ...

    def open_pull_request(
        self, repo: RepoInfo, *, branch: str, base: str, title: str, body: str, pr_id: int
    ) -> OpenedPR: ...

    def merge(self, repo: RepoInfo, *, branch: str, base: str, message: str) -> str:
        """Merge `branch` into `base`; return the merge commit."""
