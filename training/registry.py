"""Model versions and their transitions: candidate → active → retired, or rejected.

Promotion loads the adapter where the model is served: into vLLM at runtime
(`/v1/load_lora_adapter`, bot/vllm.py) when the backend is an OpenAI-compatible server, or
into the embedded backend (the worker loads the active and the previous version's adapters
when it builds its backend). The pipeline asks `serving_model` which name a job uses; the
previous version stays loaded, so `rollback` is instant. With `training.canary_share` below 1
only that share of jobs goes to the newest version, the rest to the one it replaced.

Public functions for other features: `active_version(store)`, `last_training_run(store, repo)`,
`list_versions(store)`, `version_rates(store)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import func, select

from bot.settings import Settings
from bot.store.db import Store
from bot.store.models import (
    ModelPromotion,
    ModelVersion,
    PullRequest,
    ReviewSignal,
    TrainingRun,
)

log = logging.getLogger(__name__)


class RegistryError(ValueError):
    """A transition that cannot happen; the message says why."""


def _as_dict(v: ModelVersion) -> dict:
    return {
        "id": v.id, "name": v.name, "base_model": v.base_model, "adapter_path": v.adapter_path,
        "status": v.status, "metrics": dict(v.metrics or {}),
        "dataset_card": dict(v.dataset_card or {}),
        "created_at": v.created_at,
    }


def create_candidate(store: Store, *, name: str, base_model: str, adapter_path: Path,
                     dataset_card: dict, metrics: dict | None = None) -> int:
    with store.session() as s:
        if s.scalar(select(ModelVersion).where(ModelVersion.name == name)) is not None:
            raise RegistryError(f"a model version named {name!r} exists already")
        v = ModelVersion(name=name, base_model=base_model, adapter_path=str(adapter_path),
                         status="candidate", metrics=metrics or {}, dataset_card=dataset_card)
        s.add(v)
        s.flush()
        return v.id


def set_report(store: Store, version_id: int, report: dict) -> None:
    with store.session() as s:
        v = s.get(ModelVersion, version_id)
        v.metrics = {**(v.metrics or {}), "gate": report}


def version_by_name(store: Store, name: str) -> dict | None:
    with store.session() as s:
        v = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
        return _as_dict(v) if v else None


def reject(store: Store, version_id: int) -> None:
    """The gate said no: the candidate is rejected (an active version is left alone)."""
    with store.session() as s:
        v = s.get(ModelVersion, version_id)
        if v.status == "candidate":
            v.status = "rejected"


def list_versions(store: Store) -> list[dict]:
    with store.session() as s:
        return [_as_dict(v) for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))]


def get_version(store: Store, version_id: int) -> dict | None:
    with store.session() as s:
        v = s.get(ModelVersion, version_id)
        return _as_dict(v) if v else None


def active_version(store: Store) -> dict | None:
    """The version that serves now (the newest promoted), or None (the base model serves)."""
    with store.session() as s:
        v = s.scalar(select(ModelVersion).where(ModelVersion.status == "active")
                     .order_by(ModelVersion.id.desc()))
        return _as_dict(v) if v else None


def previous_version(store: Store) -> dict | None:
    """The version the active one replaced (kept loaded for rollback and canary), if any."""
    with store.session() as s:
        event = s.scalar(select(ModelPromotion).order_by(ModelPromotion.id.desc()))
        if event is None or event.action != "promote" or event.previous_id is None:
            return None
        v = s.get(ModelVersion, event.previous_id)
        return _as_dict(v) if v and v.status == "retired" else None


def serving_versions(store: Store) -> list[dict]:
    """Versions that must be loaded where the model is served: active and previous."""
    return [v for v in (active_version(store), previous_version(store)) if v]


def serving_model(settings: Settings, store: Store, job_id: int | None = None) -> str:
    """The model name a job generates with: the active version (or, for the canary share's
    complement, the previous one), else the configured model."""
    active = active_version(store)
    if active is None:
        return settings.backend.model
    share = settings.training.canary_share
    if share < 1 and job_id is not None:
        previous = previous_version(store)
        if previous is not None and _bucket(job_id) >= share:
            return previous["name"]
    return active["name"]


def _bucket(job_id: int) -> float:
    """A stable number in [0, 1) for a job (Knuth's multiplicative hash)."""
    return ((job_id * 2654435761) % 2**32) / 2**32


# ---------------------------------------------------------------- serving


def load_into_serving(settings: Settings, version: dict, backend: object | None = None) -> str:
    """Load one version's adapter where the model is served; returns what happened."""
    path = version["adapter_path"]
    if settings.backend.kind == "openai":
        from bot import vllm

        if version["name"] in vllm.served_models(settings.backend.base_url):
            return f"vLLM already serves {version['name']}"
        vllm.load_adapter(settings.backend.base_url, version["name"], path)
        return f"loaded into vLLM at {settings.backend.base_url}"
    if backend is not None and hasattr(backend, "load_adapter"):
        backend.load_adapter(version["name"], Path(path))
        return "loaded into the embedded backend"
    return "the embedded backend loads it when a worker starts"


def promote(settings: Settings, store: Store, version_id: int, *, actor: str | None = None,
            backend: object | None = None, note: str | None = None) -> dict:
    """Make `version_id` the serving version; the one it replaces stays loaded (retired)."""
    version = get_version(store, version_id)
    if version is None:
        raise RegistryError(f"no model version {version_id} (see `codeloop models`)")
    if version["status"] == "active":
        raise RegistryError(f"version {version_id} ({version['name']}) is already active")
    if not version["adapter_path"] or not Path(version["adapter_path"]).is_dir():
        raise RegistryError(f"version {version_id} has no adapter at {version['adapter_path']}")
    # Load before the switch: a failure changes nothing.
    how = load_into_serving(settings, version, backend)
    with store.session() as s:
        current = s.scalar(select(ModelVersion).where(ModelVersion.status == "active"))
        previous_id = current.id if current else None
        if current is not None:
            current.status = "retired"
        s.get(ModelVersion, version_id).status = "active"
        s.add(ModelPromotion(action="promote", version_id=version_id, previous_id=previous_id,
                             actor=actor, note=note or how))
    log.info("model version %s (%s) promoted by %s: %s", version_id, version["name"], actor, how)
    return {"version": version["name"], "previous_id": previous_id, "serving": how}


def rollback(settings: Settings, store: Store, *, actor: str | None = None) -> dict:
    """Back to the version the active one replaced (still loaded); the active one is rejected."""
    with store.session() as s:
        current = s.scalar(select(ModelVersion).where(ModelVersion.status == "active"))
        if current is None:
            raise RegistryError("no active model version to roll back")
        event = s.scalar(select(ModelPromotion).where(
            ModelPromotion.action == "promote", ModelPromotion.version_id == current.id)
            .order_by(ModelPromotion.id.desc()))
        previous = s.get(ModelVersion, event.previous_id) if event and event.previous_id else None
        current.status = "rejected"
        if previous is not None:
            previous.status = "active"
        s.add(ModelPromotion(action="rollback", version_id=previous.id if previous else None,
                             previous_id=current.id, actor=actor, note="rolled back"))
        out = {"rolled_back": current.name,
               "now_serving": previous.name if previous else "base model"}
    return out


# ---------------------------------------------------------------- reports


def version_rates(store: Store) -> dict[str, dict]:
    """Per model version: pull requests, approvals, merges, and their rates."""
    with store.session() as s:
        prs = dict(s.execute(select(PullRequest.model_version, func.count())
                             .group_by(PullRequest.model_version)).all())
        out: dict[str, dict] = {}
        for name, n in prs.items():
            approved = s.scalar(select(func.count(func.distinct(ReviewSignal.pull_request_id)))
                                .where(ReviewSignal.model_version == name,
                                       ReviewSignal.kind == "approved")) or 0
            merged = s.scalar(select(func.count()).select_from(PullRequest).where(
                PullRequest.model_version == name, PullRequest.state == "merged")) or 0
            out[name] = {"pull_requests": n, "approved": approved, "merged": merged,
                         "approval_rate": approved / n if n else 0.0,
                         "merge_rate": merged / n if n else 0.0}
        return out


def run_as_dict(r: TrainingRun) -> dict:
    return {
        "id": r.id, "key": r.key, "repo": r.repo, "trigger": r.trigger,
        "requested_by": r.requested_by, "state": r.state, "reason": r.reason,
        "dataset_card": dict(r.dataset_card or {}), "losses": list(r.losses or []),
        "model_version_id": r.model_version_id, "timings": dict(r.timings or {}),
        "runs": r.runs or 0, "lease_owner": r.lease_owner, "lease_until": r.lease_until,
        "created_at": r.created_at, "started_at": r.started_at, "finished_at": r.finished_at,
    }


def last_training_run(store: Store, repo: str | None = None) -> dict | None:
    """The newest training run (of `repo`, or of any repository), as a dict, or None."""
    with store.session() as s:
        q = select(TrainingRun).order_by(TrainingRun.id.desc())
        if repo is not None:
            q = q.where(TrainingRun.repo == repo)
        r = s.scalar(q.limit(1))
        return run_as_dict(r) if r else None


def format_version(version: dict, rates: dict | None = None) -> str:
    from training.evaluate import format_report

    lines = [f"version {version['id']}: {version['name']} ({version['status']})",
             f"base model: {version['base_model']}", f"adapter: {version['adapter_path']}",
             f"created: {version['created_at']:%Y-%m-%d %H:%M}"]
    card = version["dataset_card"]
    if card:
        lines.append(f"dataset: {card.get('kept')} built {card.get('built_by_source')} "
                     f"dropped {card.get('dropped_by_reason')}")
    metrics = version["metrics"]
    if metrics.get("train"):
        t = metrics["train"]
        lines.append(f"training: {t.get('phases')} {t.get('steps')} steps, "
                     f"{t.get('tokens_per_second')} tokens/s")
    if metrics.get("gate"):
        lines.append(format_report(metrics["gate"]))
    else:
        lines.append("gate: not evaluated")
    if rates and version["name"] in rates:
        r = rates[version["name"]]
        lines.append(f"served: {r['pull_requests']} pull requests, approval "
                     f"{r['approval_rate']:.0%}, merge {r['merge_rate']:.0%}")
    return "\n".join(lines)
