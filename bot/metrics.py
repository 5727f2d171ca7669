"""Prometheus metrics at `/metrics`, readiness at `/readyz`.

Most metrics are read from the store when Prometheus scrapes (a custom collector), so any
process that serves `/metrics` reports the jobs every worker ran: jobs by state, stage
durations, tokens generated, validation results, pull requests and review signals per
model version, model versions (training results). Webhook acknowledgement latency is
measured where it happens, in the web process, by an ASGI middleware.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bot.store.db import Store, schema_is_current
from bot.store.models import Job, JobStage, ModelVersion, PullRequest, ReviewSignal

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
WEBHOOK_PATHS = ("/github/webhook", "/slack/events")
_ATTEMPT = re.compile(r"-\d+$")


def stage_kind(name: str) -> str:
    """`generate-2` → `generate`: attempts of one stage share a metric label."""
    return _ATTEMPT.sub("", name)


class StoreCollector(Collector):
    """Reads the store at scrape time; one query per metric family, all aggregated in SQL."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator:
        try:
            with self.store.session() as s:
                yield from self._jobs(s)
                yield from self._stages(s)
                yield from self._generation(s)
                yield from self._validation(s)
                yield from self._pull_requests(s)
                yield from self._models(s)
                yield from self._training(s)
            up = 1
        except Exception:  # noqa: BLE001 - a scrape must answer even when the database is down
            log.warning("metrics: the store could not be read", exc_info=True)
            up = 0
        g = GaugeMetricFamily("codeloop_store_up",
                              "1 when the store could be read for this scrape.")
        g.add_metric([], up)
        yield g

    def _jobs(self, s):
        g = GaugeMetricFamily("codeloop_jobs", "Jobs by state and kind.", labels=["state", "kind"])
        for state, kind, n in s.execute(
            select(Job.state, Job.kind, func.count()).group_by(Job.state, Job.kind)
        ):
            g.add_metric([state, kind], n)
        yield g

    def _stages(self, s):
        cols = [func.sum(case((JobStage.seconds <= b, 1), else_=0)) for b in STAGE_BUCKETS]
        rows = s.execute(
            select(JobStage.name, JobStage.state, func.count(), func.sum(JobStage.seconds), *cols)
            .where(JobStage.seconds.is_not(None))
            .group_by(JobStage.name, JobStage.state)
        ).all()
        merged: dict[tuple[str, str], list] = {}
        for name, state, count, total, *buckets in rows:
            key = (stage_kind(name), state)
            acc = merged.setdefault(key, [0, 0.0, [0] * len(STAGE_BUCKETS)])
            acc[0] += count
            acc[1] += float(total or 0)
            acc[2] = [a + int(b or 0) for a, b in zip(acc[2], buckets, strict=True)]
        h = HistogramMetricFamily(
            "codeloop_stage_duration_seconds",
            "Time each pipeline stage took (attempts of a stage share the label).",
            labels=["stage", "state"],
        )
        for (stage, state), (count, total, buckets) in sorted(merged.items()):
            pairs = [(str(b), c) for b, c in zip(STAGE_BUCKETS, buckets, strict=True)]
            h.add_metric([stage, state], pairs + [("+Inf", count)], sum_value=total)
        yield h

    def _generation(self, s):
        model = JobStage.output["model"].as_string()
        tokens = JobStage.output["completion_tokens"].as_integer()
        prompt = JobStage.output["prompt_tokens"].as_integer()
        rows = s.execute(
            select(model, func.count(), func.sum(tokens), func.sum(prompt))
            .where(JobStage.name.like("generate-%"), JobStage.state == "done")
            .group_by(model)
        ).all()
        gens = CounterMetricFamily("codeloop_generations", "Model generations.", labels=["model"])
        out = CounterMetricFamily(
            "codeloop_tokens_generated", "Tokens the model generated.", labels=["model"]
        )
        inp = CounterMetricFamily(
            "codeloop_prompt_tokens", "Prompt tokens sent to the model.", labels=["model"]
        )
        for name, n, generated, prompted in rows:
            label = name or "unknown"
            gens.add_metric([label], n)
            out.add_metric([label], int(generated or 0))
            inp.add_metric([label], int(prompted or 0))
        yield from (gens, out, inp)

    def _validation(self, s):
        ok = JobStage.output["ok"].as_boolean()
        rows = s.execute(
            select(ok, func.count())
            .where(JobStage.name.like("validate-%"), JobStage.state == "done")
            .group_by(ok)
        ).all()
        counts = {"passed": 0, "failed": 0}
        for value, n in rows:
            counts["passed" if value else "failed"] += n
        c = CounterMetricFamily(
            "codeloop_validations", "Validation runs by result.", labels=["result"]
        )
        for result, n in counts.items():
            c.add_metric([result], n)
        yield c
        total = sum(counts.values())
        g = GaugeMetricFamily(
            "codeloop_validation_pass_ratio", "Share of validation runs that passed."
        )
        g.add_metric([], counts["passed"] / total if total else 0.0)
        yield g

    def _pull_requests(self, s):
        g = GaugeMetricFamily(
            "codeloop_pull_requests", "Pull requests by state and model version.",
            labels=["state", "model_version"],
        )
        for state, version, n in s.execute(
            select(PullRequest.state, PullRequest.model_version, func.count())
            .group_by(PullRequest.state, PullRequest.model_version)
        ):
            g.add_metric([state, version], n)
        yield g
        c = CounterMetricFamily(
            "codeloop_review_signals",
            "Review signals (approved, changes_requested, merged, closed_unmerged, …) per model "
            "version.",
            labels=["kind", "model_version"],
        )
        for kind, version, n in s.execute(
            select(ReviewSignal.kind, ReviewSignal.model_version, func.count())
            .group_by(ReviewSignal.kind, ReviewSignal.model_version)
        ):
            c.add_metric([kind, version], n)
        yield c

    def _models(self, s):
        g = GaugeMetricFamily(
            "codeloop_model_versions",
            "Trained model versions by outcome (candidate, active, retired, rejected).",
            labels=["status"],
        )
        for status, n in s.execute(
            select(ModelVersion.status, func.count()).group_by(ModelVersion.status)
        ):
            g.add_metric([status], n)
        yield g
        metric = GaugeMetricFamily(
            "codeloop_model_metric",
            "Evaluation metrics of each model version (numbers only).",
            labels=["model_version", "status", "metric"],
        )
        for name, status, metrics in s.execute(
            select(ModelVersion.name, ModelVersion.status, ModelVersion.metrics)
        ):
            for key, value in (metrics or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    metric.add_metric([name, status, key], float(value))
        yield metric


    def _training(self, s):
        try:
            from bot.store.models import TrainingRun  # the learning loop's table
        except ImportError:
            return
        g = GaugeMetricFamily("codeloop_training_runs", "Training runs by state and trigger.",
                              labels=["state", "trigger"])
        for state, trigger, n in s.execute(
            select(TrainingRun.state, TrainingRun.trigger, func.count())
            .group_by(TrainingRun.state, TrainingRun.trigger)
        ):
            g.add_metric([state, trigger], n)
        yield g
        last = s.execute(
            select(TrainingRun.repo, TrainingRun.losses)
            .where(TrainingRun.state == "succeeded").order_by(TrainingRun.id.desc()).limit(1)
        ).first()
        loss = GaugeMetricFamily("codeloop_training_final_loss",
                                 "Final training loss of the newest successful run.",
                                 labels=["repo"])
        if last is not None and last.losses:
            final = last.losses[-1]
            value = final.get("loss") if isinstance(final, dict) else None
            if isinstance(value, int | float):
                loss.add_metric([last.repo], float(value))
        yield loss


class AckTimer:
    """ASGI middleware: how long `/github/webhook` and `/slack/events` take to answer."""

    def __init__(self, app, histogram: Histogram, paths: tuple[str, ...] = WEBHOOK_PATHS):
        self.app = app
        self.histogram = histogram
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_timed(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.histogram.labels(scope["path"], str(status["code"])).observe(
                    time.perf_counter() - started
                )

        await self.app(scope, receive, send_timed)


class Metrics:
    """One registry per web app: the store collector and the acknowledgement histogram."""

    def __init__(self, store: Store):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(store))
        self.ack_seconds = Histogram(
            "codeloop_webhook_ack_seconds",
            "Time from a webhook or Slack event request to its response.",
            ["path", "status"], buckets=ACK_BUCKETS, registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def readiness(store: Store) -> tuple[bool, str]:
    """Database reachable and migrated to the newest revision."""
    try:
        if not schema_is_current(store.engine):
            return False, "database schema is not at the newest migration"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return False, f"database unreachable: {type(exc).__name__}: {exc}"
    return True, "ok"


def routes(ctx) -> list[BaseRoute]:
    """The metrics feature: `/metrics`, `/readyz`, and the acknowledgement timer."""
    metrics = Metrics(ctx.store)
    ctx.extras["metrics"] = metrics
    ctx.extras.setdefault("middleware", []).append(
        Middleware(AckTimer, histogram=metrics.ack_seconds)
    )

    def scrape(_request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def ready(_request: Request) -> JSONResponse:
        ok, detail = readiness(ctx.store)
        body: dict = {"ready": ok, "detail": detail}
        # A part that cannot reach its peer (Slack's Web API) runs degraded: still ready
        # (the other parts serve), but said here.
        degraded = {name: problem() for name, problem in ctx.extras.get("degraded", {}).items()}
        degraded = {name: why for name, why in degraded.items() if why}
        if degraded:
            body["degraded"] = degraded
        return JSONResponse(body, status_code=200 if ok else 503)

    return [Route("/metrics", scrape), Route("/readyz", ready)]
