"""The maintainers' dashboard: server-rendered pages (jinja2), no JavaScript build.

Jobs (state, stages with timings, requester, pull request, validation output), pull
requests with their review outcome, model versions with evaluation metrics and the
training loss curve, and the retraining schedule (edit, pause, resume, retrain now).

Login is by `settings.web.dashboard_token`: the token is posted once and a signed,
HttpOnly, SameSite=Strict cookie keeps the session. Without a token the dashboard is not
served (bot.web.default_features). Forms carry a CSRF token derived from the session.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import selectinload
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from bot.dashboard.chart import loss_chart_svg
from bot.store.models import Job, JobStage, ModelVersion, PullRequest

log = logging.getLogger(__name__)

COOKIE = "codeloop_dashboard"
SESSION_SECONDS = 12 * 3600
OUTCOME_KINDS = ("merged", "closed_unmerged", "approved", "changes_requested")


# ---------------------------------------------------------------- sessions


class Sessions:
    """Signed session cookies: `issued.nonce.hmac`, keyed by the dashboard token."""

    def __init__(self, token: str, lifetime: int = SESSION_SECONDS):
        self.token = token
        self.key = hashlib.sha256(b"codeloop-dashboard\0" + token.encode()).digest()
        self.lifetime = lifetime

    def _sign(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def check_token(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def issue(self) -> str:
        body = f"{int(time.time())}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def valid(self, cookie: str | None) -> str | None:
        """The session's nonce when the cookie is genuine and fresh, else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        issued, nonce, sig = cookie.split(".")
        if not hmac.compare_digest(sig, self._sign(f"{issued}.{nonce}")):
            return None
        if not issued.isdigit() or time.time() - int(issued) > self.lifetime:
            return None
        return nonce

    def csrf(self, nonce: str) -> str:
        return self._sign(f"csrf:{nonce}")[:32]


# ---------------------------------------------------------------- the schedule (training/)


@dataclass
class ScheduleService:
    """The retraining schedule, through training.schedule (the learning loop)."""

    settings: Any
    store: Any
    module: Any

    def list(self) -> list[dict]:
        return list(self.module.show_schedules(self.settings))

    def set(self, repo: str, cron: str) -> str:
        return self.module.set_schedule(self.settings, repo, cron)

    def pause(self, repo: str) -> None:
        self.module.pause_schedule(self.settings, repo)

    def resume(self, repo: str) -> None:
        self.module.resume_schedule(self.settings, repo)

    def retrain_now(self, repo: str, requested_by: str) -> int:
        from bot.runtime import training_enqueue

        return self.module.retrain_now(self.settings, self.store, repo, requested_by,
                                       enqueue=training_enqueue(self.settings))


def schedule_service(ctx) -> ScheduleService | None:
    """`ctx.extras["schedule"]` if given, else training.schedule when this build has it."""
    if "schedule" in ctx.extras:
        return ctx.extras["schedule"]
    try:
        from training import schedule
    except ImportError:
        return None
    return ScheduleService(ctx.settings, ctx.store, schedule)


def _training_run_model():
    try:
        from bot.store.models import TrainingRun  # the learning loop's table
    except ImportError:
        return None
    return TrainingRun


# ---------------------------------------------------------------- reading the store


def _seconds(start, end) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _duration(value: float | None) -> str:
    if value is None:
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _outcome(pr: PullRequest) -> str:
    if pr.state == "merged":
        return "merged"
    if pr.state == "closed":
        return "closed unmerged"
    for signal in reversed(pr.signals):
        if signal.kind in OUTCOME_KINDS:
            return signal.kind.replace("_", " ")
    return "awaiting review"


def _validation_checks(job: Job) -> list[dict]:
    validation = (job.result or {}).get("validation")
    if not validation:
        for stage in reversed(job.stages):
            if stage.name.startswith("validate-") and stage.state == "done":
                validation = (stage.output or {}).get("validation")
                if validation is None and stage.output.get("reason"):
                    return [{"name": "edit", "ok": False, "skipped": False, "seconds": 0,
                             "output": stage.output["reason"]}]
                break
    return list((validation or {}).get("checks", []))


def _web_url(url: str | None) -> str | None:
    """Only links a browser can follow (the local forge's "url" is a path#branch)."""
    return url if url and url.startswith(("https://", "http://")) else None


def _job_row(job: Job) -> dict:
    req = job.request
    pr = None
    if job.result and job.result.get("number") is not None:
        pr = {"number": job.result["number"], "url": _web_url(job.result.get("url"))}
    return {
        "id": job.id, "state": job.state, "kind": job.kind, "repo": req.repo,
        "source": req.source, "requester": req.requester or "", "created": job.created_at,
        "duration": _duration(_seconds(job.started_at, job.finished_at)), "pr": pr,
        "requirement": req.requirement, "error": job.error,
    }


# ---------------------------------------------------------------- routes


def routes(ctx) -> list[BaseRoute]:
    token = ctx.settings.web.dashboard_token
    if token is None or not token.get_secret_value():
        return []
    sessions = Sessions(token.get_secret_value())
    secure = (ctx.settings.web.public_url or "").startswith("https://")
    env = Environment(
        loader=PackageLoader("bot.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
    )
    store = ctx.store
    TrainingRun = _training_run_model()

    def render(request: Request, name: str, status: int = 200, **values) -> HTMLResponse:
        nonce = request.state.nonce if hasattr(request.state, "nonce") else None
        schedule = schedule_service(ctx)
        html = env.get_template(name).render(
            csrf=sessions.csrf(nonce) if nonce else "", has_schedule=schedule is not None,
            path=request.url.path, **values,
        )
        return HTMLResponse(html, status_code=status)

    def guarded(handler):
        async def wrapper(request: Request) -> Response:
            nonce = sessions.valid(request.cookies.get(COOKIE))
            if nonce is None:
                target = request.url.path
                return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            request.state.nonce = nonce
            if request.method == "POST":
                form = await _form(request)
                if not hmac.compare_digest(form.get("csrf", ""), sessions.csrf(nonce)):
                    return render(request, "error.html", status=403,
                                  message="This form has expired: reload the page and try again.")
                request.state.form = form
            return await handler(request)

        return wrapper

    # -- login -----------------------------------------------------------------

    async def login(request: Request) -> Response:
        target = request.query_params.get("next", "/")
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if request.method == "GET":
            return render(request, "login.html", next=target, error=None)
        form = await _form(request)
        if not sessions.check_token(form.get("token", "")):
            log.warning("dashboard: a login with a wrong token from %s",
                        request.client.host if request.client else "?")
            return render(request, "login.html", status=401, next=target,
                          error="That token is not the dashboard token.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, sessions.issue(), max_age=SESSION_SECONDS, httponly=True,
                            samesite="strict", secure=secure)
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    # -- jobs ------------------------------------------------------------------

    async def jobs_page(request: Request) -> Response:
        state = request.query_params.get("state") or None
        with store.session() as s:
            query = (select(Job).options(selectinload(Job.request))
                     .order_by(Job.id.desc()).limit(200))
            if state:
                query = query.where(Job.state == state)
            rows = [_job_row(j) for j in s.scalars(query)]
        return render(request, "jobs.html", jobs=rows, state=state)

    async def job_page(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        with store.session() as s:
            job = s.get(Job, job_id)
            if job is None:
                return render(request, "error.html", status=404, message=f"No job {job_id}.")
            row = _job_row(job)
            stages = [
                {"name": st.name, "state": st.state, "started": st.started_at,
                 "seconds": _duration(st.seconds), "error": st.error}
                for st in s.scalars(select(JobStage).where(JobStage.job_id == job.id)
                                    .order_by(JobStage.id))
            ]
            checks = _validation_checks(job)
        return render(request, "job.html", job=row, stages=stages, checks=checks)

    # -- pull requests -----------------------------------------------------------

    async def pulls_page(request: Request) -> Response:
        with store.session() as s:
            rows = []
            query = (select(PullRequest).options(selectinload(PullRequest.revisions),
                                                 selectinload(PullRequest.signals))
                     .order_by(PullRequest.id.desc()).limit(200))
            for pr in s.scalars(query):
                rows.append({
                    "number": pr.number or pr.id, "url": _web_url(pr.url), "title": pr.title,
                    "repo": pr.repo, "branch": pr.branch, "state": pr.state,
                    "model": pr.model_version, "revisions": len(pr.revisions),
                    "outcome": _outcome(pr), "created": pr.created_at,
                    "signals": [f"{sig.kind} by {sig.author or '?'}" for sig in pr.signals],
                    "job_id": (pr.revisions[0].job_id if pr.revisions else None),
                })
        return render(request, "pulls.html", pulls=rows)

    # -- models ------------------------------------------------------------------

    async def models_page(request: Request) -> Response:
        with store.session() as s:
            rows = [
                {"id": mv.id, "name": mv.name, "status": mv.status, "base": mv.base_model,
                 "created": mv.created_at, "metrics": _numbers(mv.metrics)}
                for mv in s.scalars(select(ModelVersion).order_by(ModelVersion.id.desc()))
            ]
        keys = sorted({k for r in rows for k in r["metrics"]})
        return render(request, "models.html", models=rows, metric_keys=keys)

    async def model_page(request: Request) -> Response:
        version_id = request.path_params["version_id"]
        with store.session() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                return render(request, "error.html", status=404,
                              message=f"No model version {version_id}.")
            model = {"id": mv.id, "name": mv.name, "status": mv.status, "base": mv.base_model,
                     "adapter": mv.adapter_path, "created": mv.created_at,
                     "metrics": dict(mv.metrics or {}), "dataset": dict(mv.dataset_card or {})}
            runs = []
            if TrainingRun is not None:
                for run in s.scalars(select(TrainingRun)
                                     .where(TrainingRun.model_version_id == mv.id)
                                     .order_by(TrainingRun.id)):
                    runs.append({"id": run.id, "state": run.state, "trigger": run.trigger,
                                 "reason": run.reason, "created": run.created_at,
                                 "losses": _loss_points(run.losses)})
        points = runs[-1]["losses"] if runs else []
        chart = Markup(loss_chart_svg(points, title=f"training loss — {model['name']}"))
        return render(request, "model.html", model=model, runs=runs, chart=chart,
                      training=TrainingRun is not None)

    # -- schedule ----------------------------------------------------------------

    async def schedule_page(request: Request) -> Response:
        schedule = schedule_service(ctx)
        if schedule is None:
            return render(request, "error.html", status=404,
                          message="Retraining is not part of this build (no training package).")
        message = request.query_params.get("message")
        error = request.query_params.get("error")
        try:
            rows = schedule.list()
        except Exception as exc:  # noqa: BLE001 - show the problem, keep the page
            log.exception("dashboard: the schedule could not be read")
            rows, error = [], f"The schedule could not be read: {exc}"
        runs = []
        if TrainingRun is not None:
            with store.session() as s:
                for run in s.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())
                                     .limit(20)):
                    runs.append({"id": run.id, "repo": run.repo, "state": run.state,
                                 "trigger": run.trigger, "requested_by": run.requested_by,
                                 "created": run.created_at, "reason": run.reason,
                                 "model_version_id": run.model_version_id})
        return render(request, "schedule.html", schedules=rows, runs=runs, message=message,
                      error=error)

    async def schedule_action(request: Request) -> Response:
        schedule = schedule_service(ctx)
        if schedule is None:
            return render(request, "error.html", status=404,
                          message="Retraining is not part of this build (no training package).")
        action = request.path_params["action"]
        form = request.state.form
        repo = form.get("repo", "").strip()
        if not repo:
            return _back(error="Say which repository.")
        try:
            if action == "set":
                cron = form.get("cron", "").strip()
                if not cron:
                    return _back(error="Give a cron expression, e.g. `0 3 * * 0`.")
                text = schedule.set(repo, cron)
                message = text or f"Schedule for {repo} set to {cron}."
            elif action == "pause":
                schedule.pause(repo)
                message = f"Paused retraining of {repo}."
            elif action == "resume":
                schedule.resume(repo)
                message = f"Resumed retraining of {repo}."
            elif action == "retrain":
                run_id = schedule.retrain_now(repo, "dashboard")
                message = f"Training run {run_id} for {repo} is queued."
            else:
                return _back(error=f"Unknown action {action!r}.")
        except Exception as exc:  # noqa: BLE001 - bad input: tell the maintainer, change nothing
            log.warning("dashboard: schedule %s for %s failed: %s", action, repo, exc)
            return _back(error=str(exc))
        return _back(message=message)

    return [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", guarded(jobs_page)),
        Route("/jobs/{job_id:int}", guarded(job_page)),
        Route("/pulls", guarded(pulls_page)),
        Route("/models", guarded(models_page)),
        Route("/models/{version_id:int}", guarded(model_page)),
        Route("/schedule", guarded(schedule_page)),
        Route("/schedule/{action}", guarded(schedule_action), methods=["POST"]),
    ]


def _back(**params: str) -> RedirectResponse:
    key, value = next(iter(params.items()))
    return RedirectResponse(f"/schedule?{key}={quote(value)}", status_code=303)


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form (no multipart parser needed for these small forms)."""
    body = (await request.body())[:65536].decode(errors="replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def _numbers(metrics: dict | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _loss_points(losses: list | None) -> list[tuple[float, float]]:
    points = []
    for item in losses or []:
        if isinstance(item, dict) and "loss" in item:
            points.append((float(item.get("step", len(points))), float(item["loss"])))
        elif isinstance(item, list | tuple) and len(item) == 2:
            points.append((float(item[0]), float(item[1])))
    return points
