"""Jobs for the replay (training/replay.py): the composition root runs one job on a target
repository with a given model, in a scratch home of its own (its own SQLite store, the local
forge, log notifications), so a replay never touches the bot's store, forge or chat."""

from __future__ import annotations

from pathlib import Path

from bot import jobs
from bot.forges.local import LocalForge
from bot.runtime import LogNotifier, build_runtime, execute
from bot.settings import ForgeSettings, Settings, SlackSettings, StoreSettings
from training.replay import JobRun, RunJob


def job_runner(settings: Settings, backend, forge=None, notifier=None) -> RunJob:
    """Run each job to its end with `backend` under `settings` (as bench/replay.py does)."""

    def run(target: Path, requirement: str) -> JobRun:
        runtime = build_runtime(settings, backend=backend, forge=forge, notifier=notifier)
        sub = jobs.submit(runtime.store, source="cli", repo=str(target), requirement=requirement,
                          max_bytes=100_000)
        outcome = execute(runtime, sub.job_id)
        return JobRun(runtime.store, sub.job_id, outcome.state, outcome.error, outcome.result)

    return run


def scratch_settings(settings: Settings, home: Path) -> Settings:
    """The bot's settings with a scratch home and store, the local forge and no Slack."""
    return settings.model_copy(update={"home": home, "store": StoreSettings(),
                                       "forge": ForgeSettings(), "slack": SlackSettings()})


def gate_runners(settings: Settings, context_tokens: int | None = None):
    """What the evaluation gate replays with: `(base model dir, adapter dir or None, scratch
    home) -> RunJob`, the model loaded in this process (as the gate loads it for the loss)."""

    def make(base_model: Path, adapter: Path | None, home: Path) -> RunJob:
        from inference.backends.embedded import EMBEDDED_MODEL_NAME
        from inference.backends.transformers_backend import TransformersBackend

        backend = TransformersBackend(Path(base_model), model_name=EMBEDDED_MODEL_NAME,
                                      adapter_path=adapter, context_tokens=context_tokens)
        return job_runner(scratch_settings(settings, home), backend, forge=LocalForge(),
                          notifier=LogNotifier())

    return make
