"""The stages' typed results. Each checkpointed one serialises to the JSON its stage row
stores (`to_json`) and reads it back (`from_json`) with the same keys as ever, so a job an
older version checkpointed still resumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import datetime

from inference.prompts import ContextDoc, Prompt


def _present(obj) -> dict:
    """The dataclass's fields as JSON, leaving out the ones that are unset (None)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) is not None}


@dataclass(frozen=True)
class JobInput:
    """The job and its request as the store has them (read once, at the start)."""

    job_id: int
    kind: str  # create | revise
    feedback: str | None
    pull_request_id: int | None
    created_at: datetime
    request_id: int
    repo: str
    requirement: str
    requester: str | None
    source: str
    issue: int | None

    @property
    def query(self) -> str:
        """What the context is ranked against: the requirement, and a revision's feedback."""
        return self.requirement + ("\n" + self.feedback if self.feedback else "")


@dataclass(frozen=True)
class Checkout:
    """Stage `workspace`: the commit the job starts from and the trusted configuration."""

    base_branch: str
    start_sha: str
    branch: str | None = None  # a revision's pull request branch
    config: str | None = None  # `.codeloop.yml` of the default branch (None: there is none)
    # Checkpoints of older versions did not store the configuration: it is read again.
    config_stored: bool = True

    def to_json(self) -> dict:
        out = {"base_branch": self.base_branch, "start_sha": self.start_sha}
        if self.branch is not None:
            out["branch"] = self.branch
        if self.config_stored:
            out["config"] = self.config
        return out

    @classmethod
    def from_json(cls, data: dict) -> Checkout:
        return cls(base_branch=data["base_branch"], start_sha=data["start_sha"],
                   branch=data.get("branch"), config=data.get("config"),
                   config_stored="config" in data)


@dataclass(frozen=True)
class ContextFound:
    """Stage `context`: the repository's files best related to the request, best first."""

    paths: list[str]
    files_indexed: int
    files_read: int

    def to_json(self) -> dict:
        return {"paths": self.paths, "files_indexed": self.files_indexed,
                "files_read": self.files_read}

    @classmethod
    def from_json(cls, data: dict) -> ContextFound:
        return cls(data["paths"], data["files_indexed"], data["files_read"])


@dataclass
class Plan:
    """How the model may be asked for the change, and what it is shown: the packed context
    documents themselves (data, never re-read from a rendered prompt), the token budget and
    the ways of asking (`modes`, best first; see bot.pipeline.prompt.plan_prompt)."""

    window: int
    budget: int
    format: str
    docs: list[ContextDoc]
    modes: list[str] = field(default_factory=list)
    target: str | None = None  # the file a small model's change most likely goes to
    definition: dict | None = None  # the one definition to rewrite, with its prefilled head
    target_text: str | None = None  # the target whole, for whole-prefill
    append_prefix: str | None = None  # the answer's start when new code is appended

    def to_json(self) -> dict:
        out = {"window": self.window, "budget": self.budget, "format": self.format,
               "target": self.target, "definition": self.definition, "modes": self.modes,
               "docs": [d.__dict__ for d in self.docs]}
        if self.target_text is not None:
            out["target_text"] = self.target_text
        if self.append_prefix is not None:
            out["append_prefix"] = self.append_prefix
        return out

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(window=data["window"], budget=data["budget"], format=data["format"],
                   docs=[ContextDoc(**d) for d in data["docs"]], modes=list(data["modes"]),
                   target=data.get("target"), definition=data.get("definition"),
                   target_text=data.get("target_text"), append_prefix=data.get("append_prefix"))


@dataclass(frozen=True)
class Strategy:
    """How one attempt asks: the mode, the sampling temperature, and why (shown to people)."""

    mode: str
    temperature: float
    shown: str
    why: str

    def to_json(self) -> dict:
        return {"mode": self.mode, "temperature": self.temperature, "shown": self.shown,
                "why": self.why}

    @classmethod
    def from_json(cls, data: dict) -> Strategy:
        return cls(data["mode"], data["temperature"], data["shown"], data["why"])


@dataclass(frozen=True)
class PlannedPrompt:
    """Stage `prompt`: the first attempt's prompt, and the plan later attempts start from."""

    prompt: Prompt
    plan: Plan
    packing: dict  # what fit_prompt kept, cut and dropped

    def to_json(self) -> dict:
        return {**self.prompt.to_json(), "plan": self.plan.to_json(), "packing": self.packing}

    @classmethod
    def from_json(cls, data: dict) -> PlannedPrompt:
        return cls(Prompt.from_json(data), Plan.from_json(data["plan"]), data["packing"])


@dataclass(frozen=True)
class RetryPrompt:
    """Stage `prompt-N`: a retry's prompt and the strategy it was written for."""

    prompt: Prompt
    packing: dict
    strategy: Strategy

    def to_json(self) -> dict:
        return {**self.prompt.to_json(), "packing": self.packing,
                "strategy": self.strategy.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> RetryPrompt:
        return cls(Prompt.from_json(data), data["packing"], Strategy.from_json(data["strategy"]))


@dataclass(frozen=True)
class Generation:
    """Stage `generate-N`: the model's answer (with best of N, every candidate's)."""

    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str
    candidates: list[dict] | None = None  # {"text", "completion_tokens", "finish_reason"}
    strategy: Strategy | None = None

    @property
    def texts(self) -> list[str]:
        return [c["text"] for c in self.candidates] if self.candidates is not None else [self.text]

    def to_json(self) -> dict:
        out = _present(self)
        if self.strategy is not None:
            out["strategy"] = self.strategy.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> Generation:
        strategy = data.get("strategy")
        return cls(text=data["text"], model=data["model"], prompt_tokens=data["prompt_tokens"],
                   completion_tokens=data["completion_tokens"], seconds=data["seconds"],
                   finish_reason=data["finish_reason"], candidates=data.get("candidates"),
                   strategy=None if strategy is None else Strategy.from_json(strategy))


@dataclass(frozen=True)
class Check:
    """Stage `validate-N`: how the chosen candidate fared (an unset field is not stored).

    `retry` False: asking again would not help (a refused edit). `duplicate_of`: the answer
    repeats that attempt's and was not validated again. With several candidates, `chosen`
    is the best one's index and `candidates` every one's result."""

    ok: bool
    reason: str
    changed: list[str] = field(default_factory=list)
    problems: list[str] | None = None
    retry: bool | None = None
    refused: bool | None = None
    validation: dict | None = None
    diff_lines: int | None = None
    blobs: dict | None = None
    diff: str | None = None
    answer_sha: str | None = None
    duplicate_of: int | None = None
    chosen: int | None = None
    scores: list | None = None
    candidates: list[dict] | None = None

    def to_json(self) -> dict:
        return _present(self)

    @classmethod
    def from_json(cls, data: dict) -> Check:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def but(self, **changes) -> Check:
        return replace(self, **changes)


@dataclass(frozen=True)
class Attempt:
    """One attempt as the next one sees it: how it asked, what came back, how it fared."""

    attempt: int
    mode: str
    raw: str  # the model's text, before it was turned into an edit
    sha: str  # the answer's fingerprint: a repeat is not validated again
    check: Check


@dataclass(frozen=True)
class Chosen:
    """The validated answer that is published."""

    check: Check
    text: str  # the answer, in `format`
    format: str
    model: str
    attempt: int


@dataclass(frozen=True)
class Published:
    """Stage `publish`: the pull request and the revision pushed to it."""

    pull_request_id: int
    number: int | None
    url: str | None
    branch: str
    commit: str
    revision: int
    diff_stat: str
    validation: dict
    changed: list[str]
    attempt: int
    model: str

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
