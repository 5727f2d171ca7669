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

import atexit
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection

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


def _insert_once(conn: Connection):
    """INSERT … ON CONFLICT DO NOTHING RETURNING id, in the connection's dialect."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - codeloop runs on SQLite and PostgreSQL
        return None
    return (
        dialect_insert(Delivery)
        .on_conflict_do_nothing(index_elements=["source", "delivery_id"])
        .returning(Delivery.id)
    )


def _record_in(conn: Connection, source: str, delivery_id: str, event: str,
               payload: dict) -> Recorded:
    """One delivery inside an open transaction: one INSERT (Core, not the ORM: this is the
    acknowledgement's only work), plus a SELECT and an UPDATE on a redelivery.

    A redelivery of a row that `failed`, or is still `received` long after it arrived (its
    enqueue was lost), is a retry: a failed row is put back to `received` and `retry` tells
    the edge to enqueue it."""
    values = {"source": source, "delivery_id": delivery_id, "event": event,
              "payload": payload, "state": "received", "received_at": utcnow()}
    stmt = _insert_once(conn)
    if stmt is None:
        new_id = conn.execute(insert(Delivery).values(values).returning(Delivery.id)).scalar()
    else:
        new_id = conn.execute(stmt.values(values)).scalar()
    if new_id is not None:
        return Recorded(new_id, created=True)
    found, state, received_at = conn.execute(
        select(Delivery.id, Delivery.state, Delivery.received_at).where(
            Delivery.source == source, Delivery.delivery_id == delivery_id
        )
    ).one()
    if state == "received":  # queued a moment ago: the queue has it; long ago: lost
        lost = received_at < utcnow() - timedelta(seconds=STALE_SECONDS)
        return Recorded(found, created=False, retry=lost)
    if state != "failed":
        return Recorded(found, created=False)
    reset = conn.execute(
        update(Delivery)
        .where(Delivery.id == found, Delivery.state == "failed")
        .values(state="received", handled_at=None)
    )
    return Recorded(found, created=False, retry=reset.rowcount == 1)


def record(store: Store, *, source: str, delivery_id: str, event: str, payload: dict) -> Recorded:
    """Insert a delivery once, in its own transaction (see `_record_in`)."""
    with store.engine.begin() as conn:
        return _record_in(conn, source, delivery_id, event, payload)


@dataclass
class _Pending:
    source: str
    delivery_id: str
    event: str
    payload: dict
    future: Future


class Recorder:
    """The edge's writer: deliveries arriving together are stored in one transaction.

    Each acknowledgement must wait until its delivery is committed, and a commit costs an
    fsync (milliseconds on SQLite and PostgreSQL alike). Sixteen requests arriving at once
    used to be sixteen transactions one after another (SQLite has one writer), so the last
    waited for all the others. Here one thread takes every delivery waiting at that moment
    and commits them together: one fsync for the burst (group commit), and each request is
    answered as soon as the commit that holds it returns.

    Enqueueing for the worker happens after that, on a second thread, so the queue's own
    write is not part of the acknowledgement. The row is the durable record: if the process
    dies before an id reaches the queue, the recovery sweep (`pending`) finds the row.
    """

    def __init__(self, store: Store, enqueue: Callable[[int], object], *, max_batch: int = 64):
        self.store = store
        self.enqueue = enqueue
        self.max_batch = max_batch
        self._writes: queue.SimpleQueue[_Pending] = queue.SimpleQueue()
        self._enqueues: queue.Queue[int] = queue.Queue()
        self._started = False
        self._lock = threading.Lock()

    def record(self, *, source: str, delivery_id: str, event: str, payload: dict) -> Recorded:
        """Store one delivery (waits for its commit) and schedule its enqueue when new."""
        return self.submit(source=source, delivery_id=delivery_id, event=event,
                           payload=payload).result()

    def submit(self, *, source: str, delivery_id: str, event: str, payload: dict) -> Future:
        self._start()
        future: Future = Future()
        self._writes.put(_Pending(source, delivery_id, event, payload, future))
        return future

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every scheduled enqueue has been handed to the queue."""
        done = threading.Event()

        def wait() -> None:
            self._enqueues.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        done.wait(timeout)

    def _start(self) -> None:
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            for name, target in (("delivery-writer", self._write_loop),
                                 ("delivery-enqueuer", self._enqueue_loop)):
                threading.Thread(target=target, name=name, daemon=True).start()
            atexit.register(self.drain)
            self._started = True

    def _write_loop(self) -> None:
        conn: Connection | None = None  # kept open: no pool checkout (and ping) per batch
        while True:
            batch = [self._writes.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            try:
                if conn is None:
                    conn = self.store.engine.connect()
                with conn.begin():
                    results = [_record_in(conn, p.source, p.delivery_id, p.event, p.payload)
                               for p in batch]
            except Exception:  # noqa: BLE001 - one bad row must not fail the others
                if conn is not None:  # the connection may be broken: take a fresh one next
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                    conn = None
                results = []
                for p in batch:
                    try:
                        results.append(record(self.store, source=p.source,
                                              delivery_id=p.delivery_id, event=p.event,
                                              payload=p.payload))
                    except Exception as exc:  # noqa: BLE001 - this request gets a 500
                        results.append(exc)
            for p, result in zip(batch, results):
                if isinstance(result, Exception):
                    p.future.set_exception(result)
                    continue
                if result.enqueue:
                    self._enqueues.put(result.id)
                p.future.set_result(result)

    def _enqueue_loop(self) -> None:
        while True:
            pk = self._enqueues.get()
            try:
                self.enqueue(pk)
            except Exception:  # noqa: BLE001 - the recovery sweep enqueues it later
                log.exception("delivery row %s: enqueue failed; the recovery sweep retries", pk)
            finally:
                self._enqueues.task_done()


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
