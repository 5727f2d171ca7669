"""Log lines of a job carry its request, job and delivery ids; no secret value reaches a line."""

from __future__ import annotations

import io
import json
import logging

import pytest
from pydantic import SecretStr

from bot import deliveries, jobs, logs
from bot.ports import Generation
from bot.runtime import build_runtime, execute
from bot.settings import BackendSettings, GitHubSettings, SlackSettings, WebSettings
from tests.support import make_settings
from tests.fakes import GOOD, ScriptedBackend

SECRETS = {
    "backend": "sk-backend-key-6f1e0c",
    "slack": "xoxb-1234-5678-slacktoken",
    "signing": "slack-signing-secret-99",
    "webhook": "gh-webhook-secret-42",
    "dashboard": "dash-token-abcdef",
}


class LeakyBackend(ScriptedBackend):
    """A backend whose errors echo the credentials it was given (as careless clients do)."""

    def __init__(self, key: str):
        super().__init__(GOOD)
        self.key = key

    def generate(self, messages, params, on_text=None) -> Generation:
        logging.getLogger("inference.leaky").info("calling the model with key %s", self.key)
        raise RuntimeError(f"401 Unauthorized: Authorization: Bearer {self.key}")


@pytest.fixture
def secret_settings(tmp_path):
    return make_settings(
        tmp_path / "home",
        backend=BackendSettings(max_new_tokens=64, api_key=SecretStr(SECRETS["backend"])),
        slack=SlackSettings(bot_token=SecretStr(SECRETS["slack"]),
                            signing_secret=SecretStr(SECRETS["signing"])),
        github=GitHubSettings(webhook_secret=SecretStr(SECRETS["webhook"])),
        web=WebSettings(dashboard_token=SecretStr(SECRETS["dashboard"])),
    )


@pytest.fixture
def captured(secret_settings):
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    logs.configure(secret_settings.secret_values(), level="DEBUG", fmt="json", stream=buffer)
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_job_lines_carry_ids_and_never_a_secret(secret_settings, captured, sample_repo):
    settings = secret_settings
    runtime = build_runtime(settings, backend=LeakyBackend(SECRETS["backend"]))

    def handler(view: deliveries.DeliveryView) -> int:
        logging.getLogger("bot.github").info("issue labelled; secret %s", SECRETS["webhook"])
        sub = jobs.submit(runtime.store, source="github", repo=str(sample_repo),
                          requirement="Add a whisper(text) helper", max_bytes=100_000,
                          delivery=view.delivery_id)
        return sub.request_id

    runtime.delivery_handlers["github"] = handler
    rec = deliveries.record(runtime.store, source="github", delivery_id="gh-delivery-7",
                            event="issues.labeled", payload={"token": SECRETS["slack"]})
    assert deliveries.handle(runtime.store, rec.id, runtime.delivery_handlers) == "handled"
    with runtime.store.session() as s:
        from bot.store.models import Job

        job_id = s.query(Job.id).scalar()
        request_id = s.query(Job.request_id).scalar()
    outcome = execute(runtime, job_id)
    assert outcome.state == "failed" and "401" in outcome.error

    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines, "nothing was logged"
    for name, secret in SECRETS.items():
        assert secret not in text, f"the {name} secret reached the log"
    assert "***" in text

    delivery_lines = [x for x in lines if x["logger"] == "bot.github"]
    assert delivery_lines and delivery_lines[0]["delivery_id"] == "gh-delivery-7"
    assert delivery_lines[0]["message"] == "issue labelled; secret ***"

    job_lines = [x for x in lines if x.get("job_id") == job_id]
    assert len(job_lines) >= 3  # stage progress, the model call, the failure
    for line in job_lines:
        assert line["request_id"] == request_id
        assert line["delivery_id"] == "gh-delivery-7"
    failure = [x for x in job_lines if x["message"] == f"job {job_id}: unexpected error"]
    assert failure and "Bearer ***" in failure[0]["exception"]
    # Outside a job, no ids are attached.
    logging.getLogger("bot.test").info("idle")
    last = json.loads(captured.getvalue().splitlines()[-1])
    assert last["message"] == "idle" and "job_id" not in last


def test_text_format_for_people(secret_settings):
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.TextFormatter())
    handler.addFilter(logs.ContextFilter())
    handler.addFilter(logs.SecretFilter(secret_settings.secret_values()))
    logger = logging.getLogger("bot.text-test")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.bound(job_id=3, request_id=2, delivery_id="abc"):
            logger.warning("token %s refused", SECRETS["slack"])
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    line = buffer.getvalue().strip()
    assert line.endswith("WARNING bot.text-test [request=2 job=3 delivery=abc]: token *** refused")
