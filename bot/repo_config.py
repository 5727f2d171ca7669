"""Per-repository config: `.codeloop.yml` on the target repository's default branch.

What the bot may edit there (allowed and protected path globs), how its tests run, and the
set-up steps of its environment. Process settings are in bot/settings.py, which re-exports
these names.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# codeloop's own configuration: read from the default branch only, never edited by a change.
ALWAYS_PROTECTED = (".codeloop.yml",)

# CI, ownership and submodule files of the common forges and CI services, and secrets.
# Patterns are fnmatch globs, where `*` also matches `/`.
DEFAULT_PROTECTED = [
    ".codeloop.yml",
    ".github/workflows/**", ".github/actions/**", ".github/dependabot.yml",
    ".github/dependabot.yaml", ".github/CODEOWNERS", "CODEOWNERS", "**/CODEOWNERS",
    ".gitlab-ci.yml", "**/.gitlab-ci.yml", ".gitlab/**",
    ".circleci/**", "Jenkinsfile", "**/Jenkinsfile", ".travis.yml",
    "azure-pipelines.yml", "azure-pipelines.yaml", ".azure-pipelines/**", ".pipelines/**",
    ".buildkite/**", ".gitmodules", ".gitattributes", ".pre-commit-config.yaml",
    ".env*", "**/.env*", "*.pem", "**/*.pem", "*.key", "**/*.key",
]


class RepoConfig(BaseModel):
    """`.codeloop.yml` in the target repository. Unknown keys are an error (typos are common)."""

    model_config = ConfigDict(extra="forbid")

    trigger_label: str = Field(default="codeloop", description="Issue label that starts a job.")
    base_branch: str | None = Field(
        default=None, description="Branch pull requests target (default: the repository's HEAD)."
    )
    allowed_paths: list[str] = Field(
        default_factory=lambda: ["**"], description="Globs the bot may edit."
    )
    protected_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROTECTED), description="Globs the bot never edits."
    )
    test_command: str | None = Field(
        default=None, description="Shell command that runs the tests, e.g. `python -m pytest -q`."
    )
    edit_format: Literal["whole", "search_replace"] | None = Field(
        default=None, description="Edit format; default chosen per model (whole for small models)."
    )
    model: str | None = Field(default=None, description="Model or adapter name for this repository.")
    max_file_bytes: int = Field(default=200_000, ge=1, description="Largest file an edit may write.")
    labels: list[str] = Field(default_factory=list, description="Labels put on pull requests.")
    training_branches: list[str] = Field(
        default_factory=list,
        description="Branches besides the default branch (and `base_branch`) whose merged pull "
        "requests are training material; merges into other branches are not.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell steps that install the repository's own dependencies, e.g. "
        "`pip install -e .[test]`. They run once per change of the dependency files, in the "
        "sandbox with the network, into an environment the tests then use without it.",
    )

    @field_validator("allowed_paths", "protected_paths")
    @classmethod
    def _globs_are_relative(cls, value: list[str]) -> list[str]:
        for glob in value:
            if glob.startswith("/"):
                raise ValueError(f"path globs are relative to the repository root: {glob!r}")
        return value

    @field_validator("protected_paths")
    @classmethod
    def _own_config_stays_protected(cls, value: list[str]) -> list[str]:
        return value + [g for g in ALWAYS_PROTECTED if g not in value]

    def is_protected(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, g) for g in self.protected_paths)

    def is_allowed(self, path: str) -> bool:
        return any(fnmatch.fnmatch(path, g) for g in self.allowed_paths)


class RepoConfigError(ValueError):
    """`.codeloop.yml` could not be read; the message says where and why."""


def parse_repo_config(text: str | None) -> RepoConfig:
    if text is None or not text.strip():
        return RepoConfig()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RepoConfigError(f".codeloop.yml is not valid YAML: {exc}") from exc
    if data is None:
        return RepoConfig()
    if not isinstance(data, dict):
        raise RepoConfigError(".codeloop.yml must be a mapping of settings, e.g. `test_command: pytest`")
    try:
        return RepoConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
        )
        raise RepoConfigError(f".codeloop.yml: {problems}") from exc
