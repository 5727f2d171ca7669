"""One job from requirement (or review feedback) to a validated pull request: the stages in
order (docs/architecture.md, "The flow of a request")."""

from __future__ import annotations

from pathlib import Path

from bot import workspace
from bot.forges import ForgeError
from bot.pipeline.base import JobFailed, Ports
from bot.pipeline.candidates import Validation, record_candidates, validate_candidates
from bot.pipeline.checkout import checkout, repository, setup_environment, trusted_config
from bot.pipeline.generate import answer_in_format, answer_sha, generate
from bot.pipeline.prompt import (
    attempt_prompt,
    find_context,
    first_strategy,
    plan_prompt,
    retry_strategy,
)
from bot.pipeline.proof import requirement_test_spec
from bot.pipeline.publish import ToPublish, publish
from bot.pipeline.results import (
    Attempt,
    Check,
    Checkout,
    Chosen,
    ContextFound,
    Generation,
    JobInput,
    PlannedPrompt,
    RetryPrompt,
)
from bot.pipeline.stages import STAGE_LABELS, Stages
from bot.store.db import Store
from bot.store.models import Job
from inference.edits import default_format_for


def run_job(job_id: int, ports: Ports) -> dict:
    """Run (or resume) one job to its end. Returns the job's result for the caller.

    Raises JobFailed with a message for the requester, or JobCancelled.
    """
    settings = ports.settings
    job = read_job(ports.store, job_id)
    stages = Stages(ports.store, job_id, ports.notifier, settings.failpoint)

    # 1. workspace: the checkout, the trusted configuration, the repository's environment
    info = repository(ports, job)
    ws = stages.typed("workspace", Checkout.from_json, lambda: checkout(ports, job, info),
                      f"reading {Path(job.repo).name}")
    workdir, _ = workspace.prepare(settings.workspaces_dir, job_id, info.clone_url, ws.start_sha)
    config = trusted_config(ports, info, ws)
    env_dir = setup_environment(stages, ports, config, workdir, ws.start_sha)
    model_name = config.model or ports.serving_model(job_id)
    # The format follows the model family: an adapter answers like its base model.
    fmt = config.edit_format or default_format_for(config.model or settings.backend.model)

    # 2-3. context and prompt
    found = stages.typed("context", ContextFound.from_json,
                         lambda: find_context(ports, job, workdir, info.repo),
                         STAGE_LABELS["context"])
    planned = stages.typed("prompt", PlannedPrompt.from_json,
                           lambda: plan_prompt(ports, job, workdir, found.paths, fmt, model_name),
                           STAGE_LABELS["prompt"])
    proof_spec = requirement_test_spec(ports, stages, job, workdir, planned.plan, model_name)

    # 4-6. generate, parse, validate; retry with the errors, each retry different
    chosen = generate_until_valid(
        ports, stages, job, planned, model_name,
        Validation(ports, workdir, ws.start_sha, config, proof_spec, env_dir),
    )

    # 7. forge: commit, push, pull request
    try:
        published = stages.run(
            "publish",
            lambda: publish(ports, ToPublish(job, info, ws, workdir, config, chosen)).to_json(),
            STAGE_LABELS["publish"] if job.kind == "create" else "pushing the revision",
        )
    except ForgeError as exc:
        raise JobFailed(str(exc)) from exc
    workspace.remove(settings.workspaces_dir, job_id)
    return published


def read_job(store: Store, job_id: int) -> JobInput:
    with store.session() as s:
        job = s.get(Job, job_id)
        request = job.request
        return JobInput(
            job_id=job_id, kind=job.kind, feedback=job.feedback,
            pull_request_id=job.pull_request_id, created_at=job.created_at,
            request_id=request.id, repo=request.repo, requirement=request.requirement,
            requester=request.requester, source=request.source,
            issue=(request.reply_to or {}).get("issue"),
        )


def generate_until_valid(ports: Ports, stages: Stages, job: JobInput, planned: PlannedPrompt,
                         model_name: str, v: Validation) -> Chosen:
    """Attempts until one validates: each generates (one answer or N candidates), turns the
    answers into edits and validates them; a retry is shown the last failure and asks
    differently (bot.pipeline.prompt.retry_strategy). A refused edit is not retried."""
    settings = ports.settings
    attempts = settings.pipeline.max_attempts
    n = settings.pipeline.candidates_for(settings.backend.kind)
    plan = planned.plan
    last_reason = ""
    history: list[Attempt] = []
    for attempt in range(1, attempts + 1):
        if attempt == 1:
            current, strategy = planned.prompt, first_strategy(settings, plan)
        else:
            wanted = retry_strategy(settings, plan, history, attempt)

            def stage_retry_prompt() -> RetryPrompt:
                retry, report = attempt_prompt(ports, plan, wanted.mode, job, history[-1])
                return RetryPrompt(retry, report, wanted)

            retried = stages.typed(f"prompt-{attempt}", RetryPrompt.from_json, stage_retry_prompt,
                                   f"rewriting the prompt (attempt {attempt}/{attempts})")
            current, strategy = retried.prompt, retried.strategy
        gen = stages.typed(
            f"generate-{attempt}", Generation.from_json,
            lambda: generate(ports, current, model_name, n, strategy),
            f"generating (attempt {attempt}/{attempts})"
            + (f", {n} candidates" if n > 1 else ""),
        )
        answers = [answer_in_format(plan, strategy.mode, text, v.workdir, v.start_sha)
                   for text in gen.texts]
        check = stages.typed(
            f"validate-{attempt}", Check.from_json,
            lambda: validate_candidates(v, answers, history),
            f"validating (attempt {attempt}/{attempts})",
            on_done=record_candidates(job.job_id, attempt, current, gen, answers),
        )
        chosen = check.chosen or 0
        answer, afmt = answers[chosen]
        history.append(Attempt(attempt=attempt, mode=strategy.mode, raw=gen.texts[chosen],
                               sha=check.answer_sha or answer_sha(answer), check=check))
        if check.ok:
            return Chosen(check=check, text=answer, format=afmt, model=gen.model,
                          attempt=attempt)
        last_reason = check.reason
        if check.retry is False:
            break
    raise JobFailed(f"no valid change after {attempt} attempt(s): {last_reason}")
