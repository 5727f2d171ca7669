"""Typed values the core works with, and the ports (protocols) its adapters implement.

The pipeline sees only these: no Slack, GitHub, HTTP or ORM objects cross into it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


# ---------------------------------------------------------------- model backends


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 384
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    # Text the assistant's answer starts with (the backend continues it). Included in the
    # returned Generation.text so parsers see the whole answer.
    prefix: str = ""
    model: str | None = None  # served model or adapter name; None = the backend's default
    # Constrained answers (vLLM `structured_outputs`): the answer is exactly one of `choice`,
    # or matches `regex`. At most one of the two.
    choice: tuple[str, ...] = ()
    regex: str | None = None


@dataclass(frozen=True)
class Generation:
    text: str  # prefix + generated continuation
    model: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str = "stop"  # "stop" | "length"


class BackendError(RuntimeError):
    """The backend could not answer; `retryable` says whether a later try may succeed."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class ContextTooLong(BackendError):
    """The prompt does not fit the model's context window."""


class Backend(Protocol):
    name: str  # e.g. "transformers:smollm2-135m-instruct"

    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[str]:
        """Yield text pieces of the continuation (not the prefix) as they are generated."""

    def generate(
        self,
        messages: list[Message],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation: ...

    def count_tokens(self, text: str) -> int: ...


# ---------------------------------------------------------------- edits


@dataclass(frozen=True)
class SearchReplace:
    search: str
    replace: str


@dataclass(frozen=True)
class FileEdit:
    path: str  # repository-relative, as the model wrote it (normalised by the parser)
    content: str | None = None  # whole-file format: the complete new content
    replacements: tuple[SearchReplace, ...] = ()  # search/replace format


@dataclass
class ParsedEdits:
    edits: list[FileEdit]
    problems: list[str] = field(default_factory=list)  # what could not be parsed, in words

    @property
    def well_formed(self) -> bool:
        return bool(self.edits) and not self.problems


# ---------------------------------------------------------------- validation


@dataclass(frozen=True)
class CheckResult:
    name: str  # "syntax" | "ruff" | "tests"
    ok: bool
    output: str  # last lines of output
    seconds: float = 0.0
    skipped: bool = False


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    checks: tuple[CheckResult, ...]

    def summary(self) -> str:
        parts = []
        for c in self.checks:
            state = "skipped" if c.skipped else ("passed" if c.ok else "FAILED")
            parts.append(f"{c.name}: {state}")
        return ", ".join(parts)

    def failures_text(self, limit: int = 3000) -> str:
        text = "\n\n".join(f"## {c.name}\n{c.output}" for c in self.checks if not c.ok)
        return text[-limit:]


# ---------------------------------------------------------------- progress


class Notifier(Protocol):
    """Where progress goes: a terminal, a Slack thread, an issue comment."""

    def stage(self, job_id: int, stage: str, detail: str = "") -> None: ...

    def finished(self, job_id: int, text: str, ok: bool) -> None: ...
