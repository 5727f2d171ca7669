"""GitHub authentication: App installation tokens refreshed before expiry, or a personal
token; git traffic carries the token in a header, never in a URL or a repository's config."""

from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest
from pydantic import SecretStr

from bot.demo import make_sample_repo
from bot.forges import ForgeError
from bot.forges.github import GitHubForge
from bot.forges.github_auth import GitHubClients
from bot.settings import GitHubSettings
from tests.github_server import FakeGitHub


@pytest.fixture
def fake(tmp_path):
    server = FakeGitHub(tmp_path / "github").start()
    server.create_repo("acme/widgets", make_sample_repo(tmp_path / "source"))
    yield server
    server.stop()


def app_settings(fake, **kw) -> GitHubSettings:
    return GitHubSettings(
        api_url=fake.api_url,
        app_id=fake.app_id,
        private_key=SecretStr(fake.private_key_pem),
        retry_backoff=0.01,
        **kw,
    )


def test_installation_token_is_reused_until_it_nears_expiry(fake):
    clients = GitHubClients(app_settings(fake))
    assert clients.installation_for("acme/widgets") == fake.installation_id
    first = clients.token_for("acme/widgets")
    assert clients.token_for("acme/widgets") == first and fake.tokens_issued == 1

    fake.token_lifetime = timedelta(seconds=10)  # inside PyGithub's refresh margin
    short = GitHubClients(app_settings(fake))
    a = short.token_for("acme/widgets")
    b = short.token_for("acme/widgets")
    assert a != b and a != first and fake.tokens_issued == 3


def test_a_wrong_app_key_is_refused_with_a_clear_message(fake, tmp_path):
    other = FakeGitHub(tmp_path / "other")  # a different private key
    clients = GitHubClients(
        GitHubSettings(
            api_url=fake.api_url,
            app_id=fake.app_id,
            private_key=SecretStr(other.private_key_pem),
            max_retries=0,
        )
    )
    forge = GitHubForge(clients, tmp_path / "mirrors")
    with pytest.raises(Exception, match="401"):
        forge.check_repository("acme/widgets")


def test_personal_token_clones_and_pushes_without_the_token_in_any_url(fake, tmp_path):
    token = fake.add_personal_token()
    clients = GitHubClients(GitHubSettings(api_url=fake.api_url, token=SecretStr(token)))
    forge = GitHubForge(clients, tmp_path / "mirrors")
    info = forge.check_repository("acme/widgets")
    assert info.default_branch == "main" and forge.read_file(info, "main", "textutil.py")
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", info.clone_url, str(work)], check=True)
    (work / "NOTES.md").write_text("notes\n")
    subprocess.run(["git", "-C", str(work), "add", "NOTES.md"], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(work),
            "-c",
            "user.name=a",
            "-c",
            "user.email=a@x",
            "commit",
            "-qm",
            "notes",
        ],
        check=True,
    )
    forge.push_branch(info, work, "codeloop/9-notes")
    assert (
        forge.branch_head(info, "codeloop/9-notes")
        == subprocess.run(
            ["git", "-C", str(work), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for config in [info.clone_url + "/config", str(work / ".git" / "config")]:
        assert token not in open(config).read()
    # Git without the header is refused: the header is what authenticates.
    anonymous = subprocess.run(
        ["git", "ls-remote", f"{fake.url}/acme/widgets.git"],
        capture_output=True,
        text=True,
        env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin"},
    )
    assert anonymous.returncode != 0


def test_unknown_repository_and_bad_names_are_clear(fake, tmp_path):
    clients = GitHubClients(app_settings(fake))
    forge = GitHubForge(clients, tmp_path / "mirrors")
    with pytest.raises(ForgeError, match="not a GitHub repository name"):
        forge.check_repository("../etc")
    with pytest.raises(ForgeError, match="not found on GitHub, or codeloop is not installed"):
        forge.check_repository("acme/missing")


def test_codeloop_github_check_reports_what_is_set_up(fake, tmp_path):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CODELOOP_")}
    env.update(
        CODELOOP_HOME=str(tmp_path / "home"),
        CODELOOP_GITHUB__API_URL=fake.api_url,
        CODELOOP_GITHUB__APP_ID=str(fake.app_id),
        CODELOOP_GITHUB__PRIVATE_KEY=fake.private_key_pem,
    )

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "bot.cli", "github", "check", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    partial = run("acme/widgets")
    assert partial.returncode == 2
    assert f"ok   auth: App installation {fake.installation_id}" in partial.stdout
    assert "ok   repository: acme/widgets, default branch main" in partial.stdout
    assert "FAIL webhook" in partial.stdout and "FAIL forge" in partial.stdout
    assert fake.private_key_pem.splitlines()[1] not in partial.stdout + partial.stderr
    env.update(CODELOOP_GITHUB__WEBHOOK_SECRET="s3cret", CODELOOP_FORGE__KIND="github")
    good = run("acme/widgets")
    assert good.returncode == 0, good.stdout + good.stderr
    missing = run("acme/nothing")
    assert (
        missing.returncode == 2 and "FAIL app: acme/nothing: GitHub answered 404" in missing.stdout
    )


def test_installation_tokens_are_masked_in_logs_messages_and_sandbox_output(fake, tmp_path):
    """An App's installation token is fetched at run time (it is in no setting): once the bot
    has used it, a log line, a message to a person or a test's output that carries it (raw,
    or as the Basic header git sends) shows `***`."""
    import base64
    import io
    import logging

    from bot.logs import configure
    from bot.scrub import Scrubber

    clients = GitHubClients(app_settings(fake))
    forge = GitHubForge(clients, tmp_path / "mirrors")
    before = Scrubber([])  # built before the token exists, as the long-lived ones are
    forge.check_repository("acme/widgets")  # git fetched the mirror with the token's header
    assert fake.tokens_issued == 1
    token = clients.token_for("acme/widgets")
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()

    buffer = io.StringIO()
    handler = configure([], level="INFO", fmt="text", stream=buffer)
    try:
        logging.getLogger("codeloop.test").warning("push failed: Authorization: Basic %s; %s",
                                                   basic, token)
    finally:
        logging.getLogger().removeHandler(handler)
    assert token not in buffer.getvalue() and basic not in buffer.getvalue()
    assert "push failed" in buffer.getvalue() and "***" in buffer.getvalue()
    # The notifier's and the sandbox's scrubbers hold no setting that names this token.
    assert before(f"echo {token}") == "echo ***"
    header = Scrubber([])(f"Authorization: Basic {basic}")
    assert basic not in header and "***" in header  # the token's part of the base64 masked
