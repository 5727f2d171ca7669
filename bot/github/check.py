"""Is GitHub set up well enough for codeloop to work? The checks, in one place.

`codeloop doctor` runs the account-wide ones (`check_access`: the App's permissions, events
and installations, or the token; `check_webhook_secret`); `codeloop github check OWNER/NAME`
(`check`) asks about one repository: the App installed on it, the repository fetched, its
`.codeloop.yml`, the same webhook secret check, and the forge setting.
"""

from __future__ import annotations

from pathlib import Path

from bot.checks import Check, err
from bot.forges import ForgeError
from bot.settings import RepoConfigError, Settings, parse_repo_config

# What the GitHub App must be granted (deploy/github-app-manifest.yml asks for exactly this).
GITHUB_PERMISSIONS = {
    "contents": "write", "pull_requests": "write", "issues": "write", "metadata": "read",
}
_LEVEL = {"none": 0, "read": 1, "write": 2, "admin": 3}


def wanted(settings: Settings) -> bool:
    """Whether GitHub is meant to be used (the forge, or credentials set): doctor checks it."""
    g = settings.github
    return settings.forge.kind == "github" or g.app_id is not None or g.token is not None


def check_access(settings: Settings, timeout: float = 5.0) -> Check:
    """The App (permissions, events, installations) or the token, asked of the API."""
    import github

    from bot.forges.github_auth import (
        NO_PRIVATE_KEY, NOT_CONFIGURED, GitHubConfigError, private_key,
    )

    g = settings.github
    if g.app_id is not None:
        try:
            key = private_key(g)
        except GitHubConfigError as exc:
            return Check("github app", "fail", str(exc))
        if key is None:
            return Check("github app", "fail", NO_PRIVATE_KEY)
        try:
            integration = github.GithubIntegration(
                auth=github.Auth.AppAuth(g.app_id, key), base_url=g.api_url.rstrip("/"),
                timeout=int(max(timeout, 1)), retry=0,
            )
            app = integration.get_app()
            installations = list(integration.get_installations())
        except github.GithubException as exc:
            return Check("github app", "fail", f"GitHub refused the App ({exc.status}: "
                         f"{_gh_message(exc)}) — check CODELOOP_GITHUB__APP_ID and the private key")
        except Exception as exc:  # noqa: BLE001 - network errors, bad keys
            return Check("github app", "fail", f"cannot reach GitHub at {g.api_url} ({err(exc)}) "
                         "— check the network or CODELOOP_GITHUB__API_URL")
        granted = dict(app.permissions or {})
        short = [f"{name}: {want}" for name, want in GITHUB_PERMISSIONS.items()
                 if _LEVEL.get(granted.get(name, "none"), 0) < _LEVEL[want]]
        if short:
            return Check("github app", "fail", f"the App lacks permissions ({', '.join(short)}) — "
                         "grant them in the App's settings (deploy/github-app-manifest.yml)")
        from bot.github.events import EVENTS

        missing = sorted(set(EVENTS) - set(app.events or []))
        if missing:
            return Check("github app", "fail", f"the App is not subscribed to {', '.join(missing)} "
                         "— tick these events in the App's settings")
        if not installations:
            return Check("github app", "fail", f"the App {app.slug} is installed nowhere — install "
                         "it on the repositories codeloop should serve")
        accounts = ", ".join(sorted({i.account.login for i in installations if i.account}))
        return Check("github app", "ok", f"{app.slug} installed for {accounts or 'an account'}, "
                     "permissions and events complete")
    if g.token is not None:
        try:
            client = github.Github(auth=github.Auth.Token(g.token.get_secret_value()),
                                   base_url=g.api_url.rstrip("/"),
                                   timeout=int(max(timeout, 1)), retry=0)
            login = client.get_user().login
        except github.GithubException as exc:
            return Check("github token", "fail", f"GitHub rejected the token ({exc.status}: "
                         f"{_gh_message(exc)}) — set CODELOOP_GITHUB__TOKEN to a valid token")
        except Exception as exc:  # noqa: BLE001
            return Check("github token", "fail", f"cannot reach GitHub at {g.api_url} "
                         f"({err(exc)}) — check the network or CODELOOP_GITHUB__API_URL")
        return Check("github token", "ok", f"token of {login} accepted")
    return Check("github app", "fail", NOT_CONFIGURED)


def _gh_message(exc) -> str:
    data = getattr(exc, "data", None)
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return str(exc)[:120]


def check_webhook_secret(settings: Settings) -> Check:
    secret = settings.github.webhook_secret
    if secret is not None and secret.get_secret_value():
        return Check("github webhook secret", "ok",
                     "set; POST /github/webhook verifies X-Hub-Signature-256")
    return Check("github webhook secret", "fail", "CODELOOP_GITHUB__WEBHOOK_SECRET is not set: "
                 "webhook deliveries cannot be verified and are refused (/github/webhook is not "
                 "served) — set it to the secret in the App's webhook settings")


def check(settings: Settings, repo: str) -> tuple[bool, list[str]]:
    """`codeloop github check OWNER/NAME`, checks in order; (all passed, one line per check)."""
    from bot import github
    from bot.forges.github import GitHubForge, describe
    from bot.forges.github_auth import NOT_CONFIGURED, GitHubClients, GitHubConfigError

    lines: list[str] = []
    gh = settings.github
    if not github.configured(settings):
        return False, [f"FAIL credentials: {NOT_CONFIGURED}"]
    clients = GitHubClients(gh)
    try:
        installation = clients.installation_for(repo)
    except GitHubConfigError as exc:
        return False, [f"FAIL credentials: {exc}"]
    except Exception as exc:  # noqa: BLE001 - reported, not raised
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
        from bot.environments import describe as describe_setup

        lines.append(f"ok   set-up: {describe_setup(settings, config)}")
    except (RepoConfigError, ForgeError) as exc:
        ok = False
        lines.append(f"FAIL .codeloop.yml: {exc}")
    webhook = check_webhook_secret(settings)
    ok = ok and webhook.status == "ok"
    lines.append(f"{'ok  ' if webhook.status == 'ok' else 'FAIL'} webhook: {webhook.message}")
    if settings.forge.kind != "github":
        ok = False
        lines.append(
            "FAIL forge: set CODELOOP_FORGE__KIND=github so jobs open pull requests on GitHub"
        )
    return ok, lines
