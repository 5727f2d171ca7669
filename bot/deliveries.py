"""Deliveries from the outside (GitHub webhooks, Slack events): store once, handle in a worker.

The edge (a web route) verifies the request, calls `record` and enqueues the returned id;
that is all it does, so it answers within milliseconds. A worker calls `handle`, which
dispatches to the feature's handler by source. A redelivery is a unique-constraint hit
and is acknowledged without a second row. Rows still `received` after `stale_seconds`
(their enqueue was lost with a crashed process) are found by `pending` and re-enqueued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from bot import logs
from bot.store.db import Store
from bot.store.models import Delivery, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    id: int
    created: bool  # False: the same delivery was stored before (a redelivery)


@dataclass(frozen=True)
class DeliveryView:
    """What a handler gets: plain values, no ORM object."""

    id: int
    source: str
    delivery_id: str
    event: str
    payload: dict[str, Any]


class Ignored(Exception):
    """The delivery needs no action; the message says why (stored as its note)."""


Handler = Callable[[DeliveryView], "int | None"]  # returns the request id it created, if any


def record(store: Store, *, source: str, delivery_id: str, event: str, payload: dict) -> Recorded:
    """Insert a delivery once. Costs one INSERT (plus one SELECT on a redelivery)."""
    try:
        with store.session() as s:
            row = Delivery(source=source, delivery_id=delivery_id, event=event, payload=payload)
            s.add(row)
            s.flush()
            return Recorded(row.id, created=True)
    except IntegrityError:
        with store.session() as s:
            found = s.scalar(
                select(Delivery.id).where(
                    Delivery.source == source, Delivery.delivery_id == delivery_id
                )
            )
            return Recorded(found, created=False)


def handle(store: Store, delivery_pk: int, handlers: dict[str, Handler]) -> str:
    """Run the handler for one stored delivery, once; returns the delivery's final state."""
    with store.session() as s:
        row = s.get(Delivery, delivery_pk)
        if row is None:
            return "missing"
        if row.state != "received":
            return row.state
        view = DeliveryView(row.id, row.source, row.delivery_id, row.event, dict(row.payload))
    with logs.bound(delivery_id=view.delivery_id):
        return _handle(store, view, handlers)


def _handle(store: Store, view: DeliveryView, handlers: dict[str, Handler]) -> str:
    delivery_pk = view.id
    handler = handlers.get(view.source)
    state, note, request_id = "handled", None, None
    if handler is None:
        state, note = "ignored", f"no handler for source {view.source!r} in this process"
    else:
        try:
            request_id = handler(view)
        except Ignored as exc:
            state, note = "ignored", str(exc)
        except Exception as exc:  # noqa: BLE001 - the boundary of one delivery
            log.exception("delivery %s (%s %s): handler failed", view.delivery_id, view.source,
                          view.event)
            state, note = "failed", f"{type(exc).__name__}: {exc}"
    with store.session() as s:
        s.execute(
            update(Delivery)
            .where(Delivery.id == delivery_pk, Delivery.state == "received")
            .values(state=state, note=note, request_id=request_id, handled_at=utcnow())
        )
    return state


def pending(store: Store, stale_seconds: float = 60.0) -> list[int]:
    """Deliveries received more than `stale_seconds` ago and never handled."""
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    with store.session() as s:
        return list(
            s.scalars(
                select(Delivery.id)
                .where(Delivery.state == "received", Delivery.received_at < cutoff)
                .order_by(Delivery.id)
            )
        )
