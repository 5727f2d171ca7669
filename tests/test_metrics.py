"""`/metrics` after a real job (local forge, real git, real sandbox, scripted model answer at
the Backend port), `/readyz`, and the webhook acknowledgement timer."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from bot import jobs
from bot.runtime import build_runtime, execute
from bot.serve import build_app
from bot.store.db import Store
from bot.web import WebContext, create_app
from feedback.signals import record_local_review
from tests.fakes import GOOD, ScriptedBackend


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_after_an_end_to_end_job(settings, sample_repo):
    runtime = build_runtime(settings, backend=ScriptedBackend(GOOD))
    sub = jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                      requirement="Add a whisper(text) helper", max_bytes=100_000)
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "succeeded", outcome.error
    record_local_review(runtime.store, outcome.result["pull_request_id"], kind="approved",
                        body=None, author="maintainer")
    # A second job that stays queued: the scrape shows both states.
    jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                requirement="Add a mumble(text) helper", max_bytes=100_000)

    # The web process has its own store connection: it reads what the worker wrote.
    app = build_app(settings, Store(settings.database_url), enqueue_delivery=lambda pk: None)
    with TestClient(app) as client:
        samples = scrape(client)

    assert value(samples, "codeloop_jobs", state="succeeded", kind="create") == 1
    assert value(samples, "codeloop_jobs", state="queued", kind="create") == 1
    for stage in ("workspace", "context", "prompt", "generate", "validate", "publish"):
        count = value(samples, "codeloop_stage_duration_seconds_count", stage=stage, state="done")
        assert count == 1, stage
        total = value(samples, "codeloop_stage_duration_seconds_sum", stage=stage, state="done")
        assert total is not None and total >= 0
        assert value(samples, "codeloop_stage_duration_seconds_bucket", stage=stage,
                     state="done", le="+Inf") == 1
    # Validation ran the sample repository's tests in the sandbox and they passed.
    assert value(samples, "codeloop_validations_total", result="passed") == 1
    assert value(samples, "codeloop_validation_pass_ratio") == 1.0
    assert value(samples, "codeloop_generations_total", model="scripted") == 1
    assert value(samples, "codeloop_tokens_generated_total", model="scripted") == \
        ScriptedBackend().count_tokens(GOOD)
    assert value(samples, "codeloop_pull_requests", state="open", model_version="scripted") == 1
    assert value(samples, "codeloop_review_signals_total", kind="approved",
                 model_version="scripted") == 1
    assert value(samples, "codeloop_store_up") == 1


def test_readyz_says_whether_the_database_is_migrated(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    unmigrated = Store(url, auto_migrate=False)
    from bot.metrics import routes

    ctx = WebContext(settings=None, store=unmigrated, enqueue_delivery=lambda pk: None)
    with TestClient(create_app(ctx, [routes])) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "not at the newest migration" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200  # alive, just not ready
    migrated = Store(url)
    ctx = WebContext(settings=None, store=migrated, enqueue_delivery=lambda pk: None)
    with TestClient(create_app(ctx, [routes])) as client:
        assert client.get("/readyz").json() == {"ready": True, "detail": "ok"}


def test_webhook_acknowledgements_are_timed(tmp_path):
    """Signed deliveries through the real GitHub webhook route, timed by the middleware."""
    import hashlib
    import hmac
    import json

    from pydantic import SecretStr

    from bot.settings import GitHubSettings
    from tests.support import make_settings

    secret = "webhook-secret-for-metrics"
    settings = make_settings(tmp_path / "home",
                             github=GitHubSettings(webhook_secret=SecretStr(secret)))
    store = Store(settings.database_url)
    enqueued: list[int] = []
    app = build_app(settings, store, enqueue_delivery=enqueued.append)
    with TestClient(app) as client:
        for i in range(3):
            body = json.dumps({"action": "labeled", "issue": {"number": i}}).encode()
            signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            answer = client.post("/github/webhook", content=body, headers={
                "X-GitHub-Event": "issues", "X-GitHub-Delivery": f"d-{i}",
                "X-Hub-Signature-256": signature, "Content-Type": "application/json"})
            assert answer.status_code == 202
        refused = client.post("/github/webhook", content=b"{}", headers={
            "X-GitHub-Event": "issues", "X-GitHub-Delivery": "forged",
            "X-Hub-Signature-256": "sha256=00"})
        assert refused.status_code == 401
        client.get("/healthz")
        samples = scrape(client)
    assert len(enqueued) == 3
    assert value(samples, "codeloop_webhook_ack_seconds_count", path="/github/webhook",
                 status="202") == 3
    assert value(samples, "codeloop_webhook_ack_seconds_count", path="/github/webhook",
                 status="401") == 1
    total = value(samples, "codeloop_webhook_ack_seconds_sum", path="/github/webhook",
                  status="202")
    assert 0 < total < 30
    assert not [k for k in samples if k[0].startswith("codeloop_webhook_ack")
                and dict(k[1]).get("path") == "/healthz"]


def test_training_runs_and_their_results(sqlite_settings):
    models = pytest.importorskip("bot.store.models")
    if not hasattr(models, "TrainingRun"):
        pytest.skip("the learning loop is not in this build")
    store = Store(sqlite_settings.database_url)
    with store.session() as s:
        version = models.ModelVersion(name="acme-v1", base_model="smollm2-135m-instruct",
                                      status="active", metrics={"eval_loss": 1.5})
        s.add(version)
        s.flush()
        s.add(models.TrainingRun(key="a", repo="acme/w", trigger="schedule", state="succeeded",
                                 losses=[{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.25}],
                                 model_version_id=version.id))
        s.add(models.TrainingRun(key="b", repo="acme/w", trigger="manual", state="skipped",
                                 reason="no new merged changes"))
    app = build_app(sqlite_settings, store, enqueue_delivery=lambda pk: None)
    with TestClient(app) as client:
        samples = scrape(client)
    assert value(samples, "codeloop_training_runs", state="succeeded", trigger="schedule") == 1
    assert value(samples, "codeloop_training_runs", state="skipped", trigger="manual") == 1
    assert value(samples, "codeloop_training_final_loss", repo="acme/w") == 1.25
    assert value(samples, "codeloop_model_versions", status="active") == 1
    assert value(samples, "codeloop_model_metric", model_version="acme-v1", status="active",
                 metric="eval_loss") == 1.5
