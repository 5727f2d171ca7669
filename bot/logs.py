"""Structured logs: JSON lines in serve mode, readable text on a terminal.

Every record carries the ids of the work it belongs to (request, job, delivery) from
context variables that `bot.runtime.execute` and `bot.deliveries.handle` set, and every
configured secret value (`Settings.secret_values()`) is replaced by `***` before a line
is written, in the message, its arguments and any traceback.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from bot.scrub import Scrubber

request_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("job_id", default=None)
delivery_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "delivery_id", default=None
)

_IDS = (("request_id", request_id), ("job_id", job_id), ("delivery_id", delivery_id))


@contextmanager
def bound(**ids: object) -> Iterator[None]:
    """Set request_id / job_id / delivery_id for the log lines written inside the block."""
    tokens = []
    for name, var in _IDS:
        if ids.get(name) is not None:
            tokens.append((var, var.set(ids[name])))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_ids() -> dict[str, object]:
    return {name: var.get() for name, var in _IDS if var.get() is not None}


class ContextFilter(logging.Filter):
    """Copies the current request/job/delivery ids onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _IDS:
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


class SecretFilter(logging.Filter):
    """Replaces every secret value by `***` in a record's message and traceback."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Masks the values in their common encodings too (base64, URL, hex, escapes, PEM lines).
        self.scrub = Scrubber(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.scrub:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logged as it stands
            message = str(record.msg)
        record.msg, record.args = self.scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, _ in _IDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [job=3 request=2 delivery=abc]: message` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"{label}={getattr(record, name)}"
            for name, label in (("request_id", "request"), ("job_id", "job"),
                                ("delivery_id", "delivery"))
            if getattr(record, name, None) is not None
        ]
        record.ids = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def configure(
    secrets: Iterable[str], *, level: str = "INFO", fmt: str = "auto", stream=None
) -> logging.Handler:
    """Install one handler on the root logger: ids on every line, secrets masked.

    fmt: "json", "text", or "auto" (text when the stream is a terminal, JSON otherwise).
    Returns the handler (tests attach it to a buffer).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    for noisy in ("alembic", "httpx", "transformers", "huey", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
