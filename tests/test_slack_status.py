"""`/codeloop status` from the store: queue, running jobs, active model, approval rate."""

from __future__ import annotations

from datetime import timedelta

from bot import jobs
from bot.slack.handler import status_text
from bot.store.db import Store
from bot.store.models import Job, ModelVersion, PullRequest, ReviewSignal, utcnow
from feedback.signals import record_signal
from tests.support import make_settings


def test_status_counts_the_queue_and_the_approval_rate_of_the_last_30_days(tmp_path, db_url):
    settings = make_settings(tmp_path / "home", db_url)
    store = Store(db_url)
    subs = [jobs.submit(store, source="slack", repo="acme/api", requirement=f"change {n}",
                        max_bytes=1000) for n in range(3)]
    assert jobs.claim(store, subs[0].job_id, "other-host:1:boot", 60)
    with store.session() as s:
        s.add(ModelVersion(name="acme-api-lora-3", base_model="smollm2", status="active"))
        s.add(PullRequest(request_id=subs[0].request_id, forge="local", repo="acme/api",
                          branch="codeloop/1", base_branch="main", title="t", body="",
                          model_version="acme-api-lora-3"))
    with store.session() as s:
        pr_id = s.query(PullRequest).one().id
    for n, kind in enumerate(["approved", "approved", "approved", "changes_requested",
                              "commented", "approved"]):
        record_signal(store, pr_id, kind=kind, source="github", external_id=str(n))
    with store.session() as s:  # the last approval is older than 30 days: not counted
        old = s.query(ReviewSignal).filter(ReviewSignal.external_id == "5").one()
        old.created_at = utcnow() - timedelta(days=31)

    text = status_text(settings, store)
    assert "*Queue:* 2 waiting, 1 running" in text
    assert f"job {subs[0].job_id} on acme/api" in text
    assert "*Model:* acme-api-lora-3" in text
    assert "75% (3 approved, 1 changes requested)" in text
    with store.session() as s:
        assert s.query(Job).filter(Job.state == "queued").count() == 2
    store.close()
