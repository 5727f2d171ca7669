"""The core: one job from requirement (or review feedback) to a validated pull request.

The pipeline sees only typed values and ports. Every stage checkpoints its output in the
store, so a job that is resumed after its worker died skips what was already done: a
finished generation is never generated again.

The stages, in the order `run_job` (bot.pipeline.run) calls them:
- `workspace` (bot.pipeline.checkout): the checkout, the trusted configuration, `setup`;
- `context`, `prompt` (bot.pipeline.prompt): the files that matter, the plan of the prompt;
- `requirement-test` (bot.pipeline.proof): a model-written test, when no example is stated;
- `prompt-N`, `generate-N` (bot.pipeline.generate), `validate-N` (bot.pipeline.candidates);
- `publish` (bot.pipeline.publish).
Their typed results (bot.pipeline.results) are what the checkpoints store
(bot.pipeline.stages).
"""

from __future__ import annotations

from bot.pipeline.base import BackendUnavailable, JobCancelled, JobFailed, Ports
from bot.pipeline.publish import pr_body
from bot.pipeline.run import run_job
from bot.pipeline.stages import STAGE_LABELS, Stages, stage_label

__all__ = [
    "STAGE_LABELS",
    "BackendUnavailable",
    "JobCancelled",
    "JobFailed",
    "Ports",
    "Stages",
    "pr_body",
    "run_job",
    "stage_label",
]
