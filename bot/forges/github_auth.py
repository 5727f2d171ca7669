"""GitHub clients: a GitHub App's installation tokens (refreshed before they expire) or a PAT.

Part of the forges (the pipeline's side): the GitHub forge and the GitHub edge
(bot/github/) both sign in through these clients (docs/architecture.md, the import table).

Every client retries 5xx answers and rate limits (primary and secondary) with backoff,
honouring `Retry-After` (PyGithub's `GithubRetry`, a urllib3 `Retry`). Tokens stay inside
the auth objects: callers get a client, or `git_env(repo)` for git, whose header travels in
the environment of one git process and never in a URL.
"""

from __future__ import annotations

import base64
import logging
import threading

from bot.scrub import learn_secret
from bot.settings import GitHubSettings

log = logging.getLogger(__name__)


class GitHubConfigError(ValueError):
    """GitHub is not configured well enough to act; the message says what to set."""


NO_PRIVATE_KEY = (
    "CODELOOP_GITHUB__APP_ID is set but no private key: set CODELOOP_GITHUB__PRIVATE_KEY_PATH "
    "to the App's .pem file (or CODELOOP_GITHUB__PRIVATE_KEY to its text)"
)
NOT_CONFIGURED = (
    "GitHub is not configured: set CODELOOP_GITHUB__APP_ID and a private key (GitHub App), "
    "or CODELOOP_GITHUB__TOKEN (personal access token)"
)


def private_key(settings: GitHubSettings) -> str | None:
    """The GitHub App's private key (PEM text), or None when none is set."""
    if settings.private_key is not None:
        return settings.private_key.get_secret_value()
    if settings.private_key_path is not None:
        try:
            return settings.private_key_path.read_text()
        except OSError as exc:
            raise GitHubConfigError(
                f"cannot read the GitHub App private key {settings.private_key_path}: "
                f"{exc.strerror}"
            ) from exc
    return None


class GitHubClients:
    """One PyGithub client per installation (App) or one for all (token), built on demand."""

    def __init__(self, settings: GitHubSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._clients: dict[int | None, object] = {}
        self._auths: dict[int | None, object] = {}
        self._installations: dict[str, int] = {}
        self._default_installation = settings.installation_id
        self._identity: str | None = None

    # ------------------------------------------------------------ configuration

    @property
    def uses_app(self) -> bool:
        return self.settings.app_id is not None

    def retry(self):
        from github import GithubRetry

        s = self.settings
        # raise_on_status=False: when retries run out, PyGithub raises GithubException with
        # GitHub's last answer (status and message) instead of a bare RetryError.
        return GithubRetry(
            total=s.max_retries,
            backoff_factor=s.retry_backoff,
            secondary_rate_wait=s.secondary_rate_wait,
            raise_on_status=False,
        )

    def _app_auth(self):
        from github import Auth

        key = private_key(self.settings)
        if key is None:
            raise GitHubConfigError(NO_PRIVATE_KEY)
        return Auth.AppAuth(self.settings.app_id, key)

    def _kwargs(self) -> dict:
        s = self.settings
        return {
            "base_url": s.api_url.rstrip("/"),
            "retry": self.retry(),
            "timeout": 30,
            "seconds_between_requests": s.seconds_between_requests,
            "seconds_between_writes": s.seconds_between_writes,
        }

    # ------------------------------------------------------------ clients

    def installation_for(self, repo: str) -> int | None:
        """The App installation serving `owner/name` (None with a personal token)."""
        if not self.uses_app:
            return None
        if self._default_installation is not None:
            return self._default_installation
        with self._lock:
            if repo in self._installations:
                return self._installations[repo]
        from github import GithubIntegration

        owner, _, name = repo.partition("/")
        integration = GithubIntegration(auth=self._app_auth(), **self._kwargs())
        installation_id = integration.get_repo_installation(owner, name).id
        with self._lock:
            self._installations[repo] = installation_id
        return installation_id

    def remember_installation(self, repo: str, installation_id: int | None) -> None:
        """Webhook payloads name the installation; saves a lookup later."""
        if installation_id is not None and self.uses_app:
            with self._lock:
                self._installations[repo] = int(installation_id)

    def _auth_for(self, installation_id: int | None):
        from github import Auth

        if installation_id is None:
            token = self.settings.token
            if token is None:
                raise GitHubConfigError(NOT_CONFIGURED)
            return Auth.Token(token.get_secret_value())
        # Installation tokens are fetched on first use and refreshed before they expire.
        return self._app_auth().get_installation_auth(installation_id)

    def for_repo(self, repo: str):
        """A `github.Github` client allowed to act on `owner/name`."""
        return self._client(self.installation_for(repo))

    def _client(self, installation_id: int | None):
        from github import Github

        with self._lock:
            client = self._clients.get(installation_id)
            if client is None:
                auth = self._auth_for(installation_id)
                client = Github(auth=auth, **self._kwargs())
                self._clients[installation_id] = client
                self._auths[installation_id] = auth
            return client

    def identity(self) -> str:
        """The login the bot's own comments carry, from the API (asked once per process).

        A GitHub App acts as `<slug>[bot]` (`GET /app`, signed with the App's JWT: no
        installation token needed); a personal access token acts as its owner (`GET /user`).
        A configured `bot_login` is a fallback only, used if the API cannot say.
        """
        with self._lock:
            if self._identity is not None:
                return self._identity
        if self.uses_app:
            from github import GithubIntegration

            integration = GithubIntegration(auth=self._app_auth(), **self._kwargs())
            login = f"{integration.get_app().slug}[bot]"
        else:
            login = self._client(None).get_user().login
        with self._lock:
            self._identity = login
        return login

    def token_for(self, repo: str) -> str:
        """The current token for `repo` (an installation token is refreshed when near expiry)."""
        installation_id = self.installation_for(repo)
        self._client(installation_id)
        token = self._auths[installation_id].token
        # Installation tokens are not in the settings: from now on, mask this one wherever
        # this process writes (logs, messages, sandbox output). docs/architecture.md, "Secrets".
        learn_secret(token)
        return token

    def git_env(self, repo: str) -> dict[str, str]:
        """Environment for one git process: the token as an HTTP header, never in a URL.

        `git -c` would show in the process list; GIT_CONFIG_* variables do not, and they
        reach only the git command that is given this environment.
        """
        basic = base64.b64encode(f"x-access-token:{self.token_for(repo)}".encode()).decode()
        return {
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "http.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
        }
