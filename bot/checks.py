"""One line of a set-up check (`codeloop doctor`, `codeloop github check`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | fail | warn | skip
    message: str

    def line(self) -> str:
        return f"{self.status.upper():4}  {self.name}: {self.message}"


def err(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
