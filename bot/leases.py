"""Leases held by worker processes: who a worker is, whether its process is gone, a heartbeat,
and fault injection points.

Jobs (bot/jobs.py) and training runs (training/schedule.py) are claimed by a worker under a
lease that a heartbeat renews; a lease whose time ran out, or whose owner process on this
host is gone, may be taken over by another worker. Kernel: imports nothing of codeloop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{boot_id()}"


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def owner_is_dead(owner: str | None) -> bool:
    """True when the lease owner was a process on this host (this boot) that no longer runs."""
    if not owner:
        return True
    try:
        host, pid, boot = owner.rsplit(":", 2)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if boot != boot_id():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class Heartbeat:
    """Calls `renew()` on a background thread every third of the lease while work runs."""

    def __init__(self, renew: Callable[[], object], lease_seconds: int, name: str):
        self._renew = renew
        self._interval = max(1.0, lease_seconds / 3)
        self._name = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{name}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._renew()
            except Exception:  # noqa: BLE001 - a missed renewal is retried next beat
                log.warning("lease renewal failed for %s", self._name, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def failpoint(spec: str | None, point: str) -> None:
    """Fault injection (settings.failpoint): die here, as a crash or an OOM kill would."""
    if spec and spec == f"kill:{point}":
        log.warning("failpoint %s: killing this process", spec)
        os.kill(os.getpid(), signal.SIGKILL)
