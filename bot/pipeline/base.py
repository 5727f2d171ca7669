"""What every stage of the pipeline shares: its ports and the ways a job ends early."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bot.forges import Forge
from bot.ports import Backend, BackendError, Notifier
from bot.settings import Settings
from bot.store.db import Store


class JobFailed(Exception):
    """The job cannot succeed; the message is meant for the requester."""


class JobCancelled(Exception):
    pass


class BackendUnavailable(Exception):
    """The model server could not be reached (or broke mid-answer); a later run may succeed.

    The job boundary puts the job back on the queue with a delay instead of failing it.
    """


@dataclass
class Ports:
    settings: Settings
    store: Store
    forge: Forge
    backend: Callable[[], Backend]  # loaded on first use: resumed jobs may never need it
    notifier: Notifier
    # Which model version serves a job (the canary share decides per job id); the
    # composition root answers it from the training registry (docs/architecture.md).
    serving_model: Callable[[int], str]


def backend_failed(exc: BackendError) -> Exception:
    """What a backend error means for the job: a retryable one waits for the model server,
    any other fails the job."""
    if exc.retryable:
        return BackendUnavailable(str(exc))
    return JobFailed(f"the model backend failed: {exc}")
