"""Deliveries from the outside (GitHub webhooks, Slack events): store once, handle in a worker.

The edge (a web route) verifies the request, calls `record` and enqueues the returned id;
that is all it does, so it answers within milliseconds. A worker calls `handle`, which
dispatches to the feature's handler by source. A redelivery is a unique-constraint hit
and is acknowledged without a second row; but a redelivery of a delivery that *failed*, or
was never handled, is a retry (GitHub's "Redeliver" reuses `X-GitHub-Delivery`), so the
row goes back to `received` and is enqueued again. A worker claims a row (`received` →
`handling`) with one conditional UPDATE before it runs the handler, so two enqueues of one
row run it once. Rows still `received` after `stale_seconds` (their enqueue was lost with a
crashed process), or `handling` long after their worker died, are found by `pending`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from bot import logs
from bot.store.db import Store
from bot.store.models import Delivery, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    id: int
    created: bool  # False: the same delivery was stored before (a redelivery)
    retry: bool = False  # a redelivery of a delivery that failed or was never handled

    @property
    def enqueue(self) -> bool:
        """Whether the edge should put this delivery on the queue now."""
        return self.created or self.retry


# A claim older than this belongs to a worker that died mid-delivery; another may take it.
CLAIM_SECONDS = 600.0
# A row still `received` this long after it arrived lost its enqueue (a crashed process).
STALE_SECONDS = 60.0

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
    """Insert a delivery once. Costs one INSERT (plus a SELECT and an UPDATE on a redelivery).

    A redelivery of a row that `failed`, or is still `received` (its handling never ran), is
    a retry: a failed row is put back to `received` and `retry` tells the edge to enqueue it.
    """
    try:
        with store.session() as s:
            row = Delivery(source=source, delivery_id=delivery_id, event=event, payload=payload)
            s.add(row)
            s.flush()
            return Recorded(row.id, created=True)
    except IntegrityError:
        with store.session() as s:
            found, state, received_at = s.execute(
                select(Delivery.id, Delivery.state, Delivery.received_at).where(
                    Delivery.source == source, Delivery.delivery_id == delivery_id
                )
            ).one()
            if state == "received":  # queued a moment ago: the queue has it; long ago: lost
                lost = received_at < utcnow() - timedelta(seconds=STALE_SECONDS)
                return Recorded(found, created=False, retry=lost)
            if state != "failed":
                return Recorded(found, created=False)
            reset = s.execute(
                update(Delivery)
                .where(Delivery.id == found, Delivery.state == "failed")
                .values(state="received", handled_at=None)
            )
            return Recorded(found, created=False, retry=reset.rowcount == 1)


def handle(store: Store, delivery_pk: int, handlers: dict[str, Handler]) -> str:
    """Run the handler for one stored delivery, once; returns the delivery's final state."""
    claimed_at = utcnow()
    with store.session() as s:
        claim = s.execute(
            update(Delivery)
            .where(
                Delivery.id == delivery_pk,
                or_(
                    Delivery.state == "received",
                    (Delivery.state == "handling")
                    & (Delivery.handled_at < claimed_at - timedelta(seconds=CLAIM_SECONDS)),
                ),
            )
            .values(state="handling", handled_at=claimed_at)
        )
        row = s.get(Delivery, delivery_pk)
        if row is None:
            return "missing"
        if claim.rowcount != 1:  # handled, or being handled by another worker
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
            .where(Delivery.id == delivery_pk, Delivery.state == "handling")
            .values(state=state, note=note, request_id=request_id, handled_at=utcnow())
        )
    return state


def pending(store: Store, stale_seconds: float = STALE_SECONDS) -> list[int]:
    """Deliveries received more than `stale_seconds` ago and never handled, and deliveries
    whose worker died while handling them."""
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_seconds)
    with store.session() as s:
        return list(
            s.scalars(
                select(Delivery.id)
                .where(
                    or_(
                        (Delivery.state == "received") & (Delivery.received_at < cutoff),
                        (Delivery.state == "handling")
                        & (Delivery.handled_at < now - timedelta(seconds=CLAIM_SECONDS)),
                    )
                )
                .order_by(Delivery.id)
            )
        )
