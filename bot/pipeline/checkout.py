"""Stage `workspace` (the repository checked out at the commit the job starts from, with its
trusted configuration) and stage `setup` (the repository's own environment)."""

from __future__ import annotations

from pathlib import Path

from bot import git, workspace
from bot.forges import Forge, ForgeError, RepoInfo
from bot.pipeline.base import JobFailed, Ports
from bot.pipeline.results import Checkout, JobInput
from bot.pipeline.stages import Stages
from bot.sandbox import probe
from bot.settings import RepoConfig, RepoConfigError, parse_repo_config
from bot.store.models import PullRequest


def repository(ports: Ports, job: JobInput) -> RepoInfo:
    """The repository the job works on, as the forge describes it."""
    try:
        info = ports.forge.check_repository(job.repo) if job.kind == "create" else None
    except ForgeError as exc:
        raise JobFailed(str(exc)) from exc
    return info if info is not None else _repo_info_for_revision(ports, job.repo)


def checkout(ports: Ports, job: JobInput, info: RepoInfo) -> Checkout:
    """Stage `workspace`: the branch the job starts from, its head, and `.codeloop.yml`."""
    settings = ports.settings
    config_text = _trusted_config_text(ports.forge, info)
    if job.kind == "revise":
        with ports.store.session() as s:
            pr = s.get(PullRequest, job.pull_request_id)
            if pr.state != "open":
                raise JobFailed(f"pull request #{pr.number} is {pr.state}; nothing to revise")
            branch, base_branch = pr.branch, pr.base_branch
        if ports.forge.branch_head(info, branch) is None:
            raise JobFailed(f"branch {branch} was deleted; the revision was dropped")
        _, sha = workspace.prepare(settings.workspaces_dir, job.job_id, info.clone_url, branch)
        return Checkout(base_branch=base_branch, start_sha=sha, branch=branch, config=config_text)
    base_branch = load_config(config_text).base_branch or info.default_branch
    _, sha = workspace.prepare(settings.workspaces_dir, job.job_id, info.clone_url, base_branch)
    return Checkout(base_branch=base_branch, start_sha=sha, config=config_text)


def trusted_config(ports: Ports, info: RepoInfo, ws: Checkout) -> RepoConfig:
    """The configuration the job started with, from the default branch: never the PR
    branch's, which a generated change could have edited (docs/architecture.md, "Trust
    boundaries"). A worker that cannot sandbox the repository's tests stops here."""
    config = load_config(ws.config if ws.config_stored else _trusted_config_text(ports.forge, info))
    if config.test_command and ports.settings.sandbox.isolation != "none":
        found = probe(ports.settings.sandbox)
        if not found.ok:
            raise JobFailed(f"this worker cannot run the repository's tests safely, so nothing "
                            f"was generated: {found.detail}")
    return config


def _trusted_config_text(forge: Forge, info: RepoInfo) -> str | None:
    """`.codeloop.yml` as the default branch has it: the one place configuration comes from."""
    return forge.read_file(info, info.default_branch, ".codeloop.yml")


def load_config(text: str | None) -> RepoConfig:
    try:
        return parse_repo_config(text)
    except RepoConfigError as exc:
        raise JobFailed(str(exc)) from exc


def _repo_info_for_revision(ports: Ports, repo: str) -> RepoInfo:
    """Revisions push to the PR branch; the user's own checkout may be dirty meanwhile."""
    try:
        return ports.forge.check_repository(repo)
    except ForgeError:
        top = Path(repo)
        branch = git.current_branch(top) or "main"
        return RepoInfo(repo=str(top), clone_url=str(top), default_branch=branch)


def setup_environment(stages: Stages, ports: Ports, config: RepoConfig, workdir: Path,
                      sha: str) -> Path | None:
    """Build (or reuse) the environment of `.codeloop.yml` `setup:`, before any generation."""
    if not config.setup:
        return None
    from bot.environments import SetupFailed, ensure
    from bot.sandbox import SandboxUnavailable

    def stage_setup() -> dict:
        try:
            env = ensure(ports.settings, config, workdir, sha, ports.settings.secret_values())
        except SetupFailed as exc:
            raise JobFailed(str(exc)) from exc
        except SandboxUnavailable as exc:
            raise JobFailed(f"the repository's set-up was not run: {exc}") from exc
        return env.to_json()

    done = stages.run("setup", stage_setup, "setting up the repository's environment")
    path = Path(done["path"])
    if not path.is_dir():  # evicted since the checkpoint: build it again
        env = ensure(ports.settings, config, workdir, sha, ports.settings.secret_values())
        path = env.path
    return path
