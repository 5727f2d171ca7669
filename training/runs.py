"""What a training run does once a worker holds it (training/schedule.py claims it under a
lease): check there is enough new data, build the dataset (from the repository's forge),
train, evaluate against the active version (training/evaluate.py), and promote or reject.

A run taken over from a crashed worker resumes: the dataset it saved is reused and training
continues from its newest checkpoint (`run_dir` keeps both).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update

from bot import leases
from bot.settings import Settings
from bot.store.db import Store
from bot.store.models import TrainingRun, utcnow

log = logging.getLogger(__name__)


def finish(store: Store, run_id: int, state: str, reason: str | None,
           owner: str | None = None, **values) -> None:
    with store.session() as s:
        q = update(TrainingRun).where(TrainingRun.id == run_id)
        if owner is not None:  # a worker that lost its lease does not overwrite the new one
            q = q.where(TrainingRun.lease_owner == owner)
        s.execute(q.values(state=state, reason=reason, finished_at=utcnow(), lease_until=None,
                           **values))


def base_model_dir(settings: Settings) -> Path:
    from inference.backends.embedded import ensure_converted

    path, _ = ensure_converted(settings.embedded.cache_dir)
    return Path(path)


def run_dir(settings: Settings, run_id: int) -> Path:
    """Where a run keeps its dataset, checkpoints and adapter (shared storage when workers
    are on several machines: a resumed run continues from here)."""
    return (settings.training.adapters_dir or settings.home / "adapters") / f"run-{run_id}"


def _saved_dataset(out: Path):
    """The dataset a run saved before its worker died, or None."""
    from training.train import load_saved

    if not (out / "dataset" / "dataset_card.json").exists():
        return None
    data = load_saved(out / "dataset")
    until = data.card.get("data_until")
    data.data_until = datetime.fromisoformat(until) if until else None
    return data


def train_claimed(settings: Settings, store: Store, run_id: int, owner: str, *,
                   backend, base_model, max_steps, repo_dirs, source, replay=None) -> None:
    from training import registry

    run = registry.run_as_dict(_get(store, run_id))
    repo = run["repo"]
    timings: dict = dict(run["timings"] or {})
    out = run_dir(settings, run_id)
    try:
        from training.dataset import build_dataset, count_new_examples
        from training.sources import locate

        data = _saved_dataset(out) if run["runs"] > 1 else None
        if data is not None:
            log.info("training run %s: resumed (claim %s) with its saved dataset", run_id,
                     run["runs"])
        else:
            with store.session() as s:
                since = s.scalar(select(TrainingRun.data_until).where(
                    TrainingRun.repo == repo, TrainingRun.state == "succeeded",
                    TrainingRun.id != run_id).order_by(TrainingRun.id.desc()).limit(1))
            new = count_new_examples(store, repo, since)
            minimum = settings.training.min_new_examples
            if new < minimum:
                after = f" since {since:%Y-%m-%d %H:%M}" if since else ""
                reason = f"only {new} new merged change(s){after}; the minimum is {minimum}"
                finish(store, run_id, "skipped", reason, owner)
                log.info("training run %s for %s skipped: %s", run_id, repo, reason)
                return
        base = Path(base_model) if base_model else base_model_dir(settings)
        where = locate(repo, settings, repo_dirs, source)
        if data is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(base)
            t0 = time.perf_counter()
            data = build_dataset(
                settings, store, repo, source=source, located=where,
                count_tokens=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
            timings["dataset"] = round(time.perf_counter() - t0, 2)
            data.save(out / "dataset")
        with store.session() as s:
            s.get(TrainingRun, run_id).dataset_card = data.card
        if not data.sft:
            finish(store, run_id, "skipped", "no usable examples after cleaning (see the card)",
                    owner)
            return
        from training.train import train

        t0 = time.perf_counter()
        result = train(settings, data, base, out, max_steps=max_steps,
                       on_checkpoint=lambda: leases.failpoint(settings.failpoint,
                                                              "train:checkpoint"))
        timings["train"] = round(time.perf_counter() - t0, 2)
        with store.session() as s:
            s.get(TrainingRun, run_id).losses = [{"step": p["step"], "loss": p["loss"]}
                                                 for p in result.losses]
        name = f"{_slug(repo)}-r{run_id}"
        existing = registry.version_by_name(store, name)
        if existing is not None:  # made by the worker that died; its gate may be done
            version_id = existing["id"]
        else:
            version_id = registry.create_candidate(
                store, name=name, base_model=str(base), adapter_path=result.adapter_dir,
                dataset_card=data.card, metrics={"train": result.summary()})
        from training.sources import repo_config_at
        from training.evaluate import evaluate_candidate

        active = registry.active_version(store)
        if active is not None and active["id"] == version_id:
            finish(store, run_id, "succeeded", "promoted (before its worker was replaced)",
                    owner, model_version_id=version_id, data_until=data.data_until,
                    timings=timings)
            return
        t0 = time.perf_counter()
        report = evaluate_candidate(
            settings, base, data.heldout, (name, result.adapter_dir),
            (active["name"], Path(active["adapter_path"])) if active else None,
            edit_format=data.edit_format, repo_dir=where.dir,
            config=repo_config_at(where.dir, where.default_branch), replay=replay,
            workdir=out / "replay")
        timings["evaluate"] = round(time.perf_counter() - t0, 2)
        registry.set_report(store, version_id, report)
        verdict = report["decision"]
        if verdict == "promote" and settings.training.auto_promote:
            registry.promote(settings, store, version_id, actor="gate", backend=backend)
            reason = "promoted: " + "; ".join(report["reasons"])
        elif verdict == "promote":
            reason = "passed the gate; waiting for `codeloop promote " + str(version_id) + "`"
        else:
            registry.reject(store, version_id)
            reason = "rejected by the gate: " + "; ".join(report["reasons"])
        finish(store, run_id, "succeeded", reason, owner, model_version_id=version_id,
                data_until=data.data_until, timings=timings)
    except Exception as exc:  # noqa: BLE001 - the training job's boundary
        log.exception("training run %s for %s failed", run_id, repo)
        finish(store, run_id, "failed", f"{type(exc).__name__}: {exc}", owner, timings=timings)




def _get(store: Store, run_id: int) -> TrainingRun:
    with store.session() as s:
        return s.get(TrainingRun, run_id)


def _slug(repo: str) -> str:
    from bot import git

    return git.slugify(Path(repo).name if "/" in repo and Path(repo).exists() else repo, limit=40)
