"""codeloop wired for GitHub against the local GitHub server: signed deliveries in, a real
huey queue (SQLite) drained by the same task functions a worker runs, PyGithub over HTTP."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from starlette.testclient import TestClient

from bot.demo import make_sample_repo
from bot.github.webhook import routes, sign
from bot.runtime import Runtime, build_queue, build_runtime
from bot.settings import ForgeSettings, GitHubSettings, Settings
from bot.web import WebContext, create_app, default_features
from tests.conftest import make_settings
from tests.github_server import FakeGitHub, FakeRepo

WEBHOOK_SECRET = "whsec-test-8c1f0e"
REPO = "acme/widgets"


@dataclass
class GitHubEnv:
    fake: FakeGitHub
    repo: FakeRepo
    settings: Settings
    runtime: Runtime
    huey: object
    client: TestClient

    def deliver(
        self,
        event: str,
        payload: dict,
        delivery_id: str | None = None,
        secret: str | None = WEBHOOK_SECRET,
        signature: str | None = None,
    ):
        body = json.dumps(payload).encode()
        headers = {
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
            "Content-Type": "application/json",
        }
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        elif secret is not None:
            headers["X-Hub-Signature-256"] = sign(secret, body)
        return self.client.post("/github/webhook", content=body, headers=headers)

    def work(self, limit: int = 50) -> int:
        """Run queued tasks as a worker would (handle_delivery, run_job), until none is left."""
        done = 0
        while done < limit:
            task = self.huey.dequeue()
            if task is None:
                return done
            self.huey.execute(task)
            done += 1
        raise AssertionError("the queue did not drain")

    def close(self) -> None:
        self.client.close()
        self.runtime.close()
        self.fake.stop()


def github_settings(
    fake: FakeGitHub, home: Path, db_url: str | None = None, **gh_overrides
) -> Settings:
    gh = GitHubSettings(
        api_url=fake.api_url,
        app_id=fake.app_id,
        private_key=SecretStr(fake.private_key_pem),
        webhook_secret=SecretStr(WEBHOOK_SECRET),
        max_retries=4,
        retry_backoff=0.05,
        secondary_rate_wait=1.0,
        seconds_between_requests=0,  # GitHub's pacing, pointless against a local server
        seconds_between_writes=0,
        **gh_overrides,
    )
    return make_settings(home, db_url, forge=ForgeSettings(kind="github"), github=gh)


def make_env(
    tmp_path: Path, backend, db_url: str | None = None, files: dict | None = None, **gh_overrides
) -> GitHubEnv:
    source = make_sample_repo(tmp_path / "source", files)
    fake = FakeGitHub(tmp_path / "github").start()
    repo = fake.create_repo(REPO, source)
    repo.permissions.update({"alice": "write", "mallory": "read"})
    settings = github_settings(fake, tmp_path / "home", db_url, **gh_overrides)
    runtime = build_runtime(settings, backend=backend)
    huey = build_queue(settings, lambda: runtime)
    huey.codeloop_runtime()  # binds runtime.enqueue_job to the queue's run_job task
    ctx = WebContext(
        settings=settings, store=runtime.store, enqueue_delivery=huey.codeloop_handle_delivery
    )
    features = default_features(settings)
    assert routes in features
    client = TestClient(create_app(ctx, features))
    return GitHubEnv(fake, repo, settings, runtime, huey, client)
