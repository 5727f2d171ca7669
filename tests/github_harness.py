"""codeloop wired for GitHub against the local GitHub server: signed deliveries in, a real
huey queue (SQLite) drained by the same task functions a worker runs, PyGithub over HTTP."""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlencode
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr
from starlette.testclient import TestClient

from bot.demo import make_sample_repo
from bot.github.webhook import routes, sign
from bot.runtime import Runtime, build_queue, build_runtime
from bot.settings import ForgeSettings, GitHubSettings, Settings
from bot.web import WebContext, create_app, default_features
from tests.support import make_settings
from tests.github_server import FakeGitHub, FakeRepo

WEBHOOK_SECRET = "whsec-test-8c1f0e"
FIXTURES = Path(__file__).parent / "fixtures" / "github"


def _merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base.get(key), value)
        return out
    return over


def octokit(name: str, fake: FakeGitHub, repo: FakeRepo, sender: str, **sections) -> dict:
    """GitHub's published example payload `name` (octokit/webhooks payload-examples, e.g.
    "pull_request.reopened"), pointed at the local server: its repository, sender and
    installation are ours, and each given section is merged over the example's, so every
    field the example has and we do not set keeps GitHub's shape and value."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    data.pop("organization", None)
    data["repository"] = _merge(data.get("repository"), fake.repo_json(fake.url, repo))
    data["sender"] = _merge(data.get("sender"), fake.user_json(fake.url, sender))
    data["installation"] = {"id": fake.installation_id, "node_id": "MDIzOkludGVncmF0aW9u"}
    for key, value in sections.items():
        data[key] = _merge(data.get(key), value)
    return data
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
        form: bool = False,
    ):
        """POST a delivery as GitHub does: JSON, or (`form`) `payload=` form-encoded."""
        body = json.dumps(payload).encode()
        content_type = "application/json"
        if form:
            body = urlencode({"payload": body.decode()}).encode()
            content_type = "application/x-www-form-urlencoded"
        headers = {
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
            "Content-Type": content_type,
        }
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        elif secret is not None:
            headers["X-Hub-Signature-256"] = sign(secret, body)
        return self.client.post("/github/webhook", content=body, headers=headers)

    def work(self, limit: int = 50) -> int:
        """Run queued tasks as a worker would, until none is left: deliveries first (their
        own queue and consumer), then jobs."""
        self.client.app.state.ctx.recorder.drain()  # enqueues follow the answer by a moment
        done = 0
        while done < limit:
            for queue in (self.huey.codeloop_deliveries, self.huey):
                task = queue.dequeue()
                if task is not None:
                    queue.execute(task)
                    done += 1
                    break
            else:
                return done
        raise AssertionError("the queue did not drain")

    def handle_next_delivery(self) -> None:
        """One delivery from the deliveries queue, as its consumer would take it."""
        self.client.app.state.ctx.recorder.drain()
        queue = self.huey.codeloop_deliveries
        queue.execute(queue.dequeue())

    def close(self) -> None:
        self.client.close()
        self.runtime.close()
        self.fake.stop()


def github_settings(
    fake: FakeGitHub, home: Path, db_url: str | None = None, **gh_overrides
) -> Settings:
    gh_overrides.setdefault("app_id", fake.app_id)
    gh_overrides.setdefault("private_key", SecretStr(fake.private_key_pem))
    gh = GitHubSettings(
        api_url=fake.api_url,
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
    tmp_path: Path,
    backend,
    db_url: str | None = None,
    files: dict | None = None,
    *,
    app_slug: str = "codeloop",
    pat_owner: str | None = None,
    **gh_overrides,
) -> GitHubEnv:
    """`pat_owner`: sign in with a personal access token owned by that person (admin on
    the repository) instead of the GitHub App."""
    source = make_sample_repo(tmp_path / "source", files)
    fake = FakeGitHub(tmp_path / "github", app_slug=app_slug).start()
    repo = fake.create_repo(REPO, source)
    repo.permissions.update({"alice": "write", "mallory": "read"})
    if pat_owner is not None:
        repo.permissions[pat_owner] = "admin"
        gh_overrides.update(
            app_id=None, private_key=None, token=SecretStr(fake.add_personal_token(pat_owner))
        )
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
