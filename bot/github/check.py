"""`codeloop github check OWNER/NAME`: is GitHub set up well enough for codeloop to work?"""

from __future__ import annotations

from pathlib import Path

from bot.forges import ForgeError
from bot.settings import RepoConfigError, Settings, parse_repo_config


def check(settings: Settings, repo: str) -> tuple[bool, list[str]]:
    """Checks in order; returns (all passed, one line per check)."""
    from bot import github
    from bot.forges.github import GitHubForge
    from bot.forges.github_auth import GitHubClients, GitHubConfigError

    lines: list[str] = []
    gh = settings.github
    if not github.configured(settings):
        return False, [
            "FAIL credentials: set CODELOOP_GITHUB__APP_ID and a private key, "
            "or CODELOOP_GITHUB__TOKEN"
        ]
    clients = GitHubClients(gh)
    try:
        installation = clients.installation_for(repo)
    except GitHubConfigError as exc:
        return False, [f"FAIL credentials: {exc}"]
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        from bot.forges.github import describe

        return False, [f"FAIL app: {repo}: {describe(exc)} (is the App installed on it?)"]
    lines.append(
        f"ok   auth: {'App installation ' + str(installation) if installation else 'token'}"
    )
    forge = GitHubForge(clients, Path(settings.home) / "mirrors")
    try:
        info = forge.check_repository(repo)
    except ForgeError as exc:
        return False, lines + [f"FAIL repository: {exc}"]
    lines.append(
        f"ok   repository: {info.repo}, default branch {info.default_branch}, fetched over HTTPS"
    )
    ok = True
    try:
        config = parse_repo_config(forge.read_file(info, info.default_branch, ".codeloop.yml"))
        lines.append(
            f"ok   .codeloop.yml: trigger label {config.trigger_label!r}, "
            f"tests: {config.test_command or 'none configured'}"
        )
        from bot.environments import describe

        lines.append(f"ok   set-up: {describe(settings, config)}")
    except (RepoConfigError, ForgeError) as exc:
        ok = False
        lines.append(f"FAIL .codeloop.yml: {exc}")
    if gh.webhook_secret is None:
        ok = False
        lines.append(
            "FAIL webhook: CODELOOP_GITHUB__WEBHOOK_SECRET is not set, so "
            "/github/webhook is not served"
        )
    else:
        lines.append("ok   webhook: POST /github/webhook verifies X-Hub-Signature-256")
    if settings.forge.kind != "github":
        ok = False
        lines.append(
            "FAIL forge: set CODELOOP_FORGE__KIND=github so jobs open pull requests on GitHub"
        )
    return ok, lines
