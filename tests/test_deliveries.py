"""Deliveries: stored once however often they arrive, handled once, lost enqueues recovered."""

from __future__ import annotations

import threading

from starlette.testclient import TestClient

from bot import deliveries
from bot.store.db import Store
from bot.store.models import Delivery
from bot.web import WebContext, create_app


def test_redelivery_is_stored_once_and_handled_once(db_url):
    store = Store(db_url)
    calls: list[str] = []

    def handler(view: deliveries.DeliveryView) -> None:
        calls.append(view.delivery_id)

    first = deliveries.record(store, source="github", delivery_id="d-1", event="issues.labeled",
                              payload={"n": 1})
    again = deliveries.record(store, source="github", delivery_id="d-1", event="issues.labeled",
                              payload={"n": 1})
    other_source = deliveries.record(store, source="slack", delivery_id="d-1", event="message",
                                     payload={})
    assert first.created and not again.created and again.id == first.id
    assert other_source.created and other_source.id != first.id

    assert deliveries.handle(store, first.id, {"github": handler}) == "handled"
    assert deliveries.handle(store, first.id, {"github": handler}) == "handled"
    assert calls == ["d-1"]


def test_concurrent_redeliveries_make_one_row(db_url):
    store = Store(db_url)
    results: list[deliveries.Recorded] = []
    barrier = threading.Barrier(6)

    def deliver() -> None:
        barrier.wait()
        results.append(deliveries.record(store, source="slack", delivery_id="Ev1",
                                         event="event_callback", payload={}))

    threads = [threading.Thread(target=deliver) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.created for r in results) == 1
    assert len({r.id for r in results}) == 1
    with store.session() as s:
        assert s.query(Delivery).count() == 1


def test_ignored_and_failing_handlers_are_recorded_with_the_reason(db_url):
    store = Store(db_url)

    def ignore(_view):
        raise deliveries.Ignored("label 'bug' is not the trigger label")

    def boom(_view):
        raise RuntimeError("GitHub answered 500")

    a = deliveries.record(store, source="github", delivery_id="a", event="issues.labeled",
                          payload={})
    b = deliveries.record(store, source="github", delivery_id="b", event="issues.labeled",
                          payload={})
    assert deliveries.handle(store, a.id, {"github": ignore}) == "ignored"
    assert deliveries.handle(store, b.id, {"github": boom}) == "failed"
    with store.session() as s:
        assert "not the trigger label" in s.get(Delivery, a.id).note
        assert "500" in s.get(Delivery, b.id).note


def test_a_delivery_whose_enqueue_was_lost_is_found_later(sqlite_settings):
    store = Store(sqlite_settings.database_url)
    rec = deliveries.record(store, source="slack", delivery_id="Ev9", event="event_callback",
                            payload={})
    assert deliveries.pending(store, stale_seconds=3600) == []
    assert deliveries.pending(store, stale_seconds=-1) == [rec.id]
    deliveries.handle(store, rec.id, {"slack": lambda view: None})
    assert deliveries.pending(store, stale_seconds=-1) == []


def test_web_app_serves_health_and_feature_routes(sqlite_settings):
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    store = Store(sqlite_settings.database_url)
    ctx = WebContext(settings=sqlite_settings, store=store, enqueue_delivery=lambda pk: None)

    def feature(c: WebContext):
        return [Route("/hello", lambda r: PlainTextResponse(f"db={c.store is store}"))]

    client = TestClient(create_app(ctx, [feature]))
    assert client.get("/healthz").json() == {"ok": True}
    assert client.get("/hello").text == "db=True"
