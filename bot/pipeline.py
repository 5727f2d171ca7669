"""The core: one job from requirement (or review feedback) to a validated pull request.

The pipeline sees only typed values and ports. Every stage checkpoints its output in the
store, so a job that is resumed after its worker died skips what was already done: a
finished generation is never generated again.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from bot import changed_lines, git, jobs, reqtests, verdict, workspace
from bot.forges import Forge, ForgeError, RepoInfo
from bot.ports import (
    Backend,
    BackendError,
    GenerationParams,
    Notifier,
    ValidationResult,
)
from bot.settings import RepoConfig, RepoConfigError, Settings, parse_repo_config
from bot.store.db import Store
from bot.store.models import (
    Candidate,
    EditFormatStat,
    Job,
    JobStage,
    PullRequest,
    Revision,
    utcnow,
)
from bot.sandbox import probe
from bot.validate import SandboxError, validate
from inference import context as ctx
from inference.edits import (
    EditRejected,
    apply_edits,
    default_format_for,
    describe_format,
    parse_edits,
)
from inference.edits import definition_answer, find_definition
from inference.prompts import ContextDoc, Prompt, PromptTooLong, fit_prompt

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """The job cannot succeed; the message is meant for the requester."""


class JobCancelled(Exception):
    pass


class BackendUnavailable(Exception):
    """The model server could not be reached (or broke mid-answer); a later run may succeed.

    The job boundary puts the job back on the queue with a delay instead of failing it.
    """


@dataclass
class Ports:
    settings: Settings
    store: Store
    forge: Forge
    backend: Callable[[], Backend]  # loaded on first use: resumed jobs may never need it
    notifier: Notifier


# ---------------------------------------------------------------- stage checkpoints


class Stages:
    """Runs named stages once per job; a `done` row is the checkpoint a resume reads back."""

    def __init__(self, store: Store, job_id: int, notifier: Notifier, failpoint: str | None = None):
        self.store = store
        self.job_id = job_id
        self.notifier = notifier
        self.failpoint = failpoint

    def done(self, name: str) -> dict | None:
        with self.store.session() as s:
            row = s.scalar(
                select(JobStage).where(
                    JobStage.job_id == self.job_id, JobStage.name == name, JobStage.state == "done"
                )
            )
            return None if row is None else dict(row.output)

    def run(
        self,
        name: str,
        fn: Callable[[], dict],
        detail: str = "",
        on_done: Callable[[Session, dict], None] | None = None,
    ) -> dict:
        cached = self.done(name)
        if cached is not None:
            log.info("job %s: stage %s already done, reusing its result", self.job_id, name)
            return cached
        if jobs.is_cancelled(self.store, self.job_id):
            raise JobCancelled()
        self.notifier.stage(self.job_id, name, detail)
        with self.store.session() as s:
            # A `running` row left by a worker that died is history, not a checkpoint.
            s.execute(
                update(JobStage)
                .where(JobStage.job_id == self.job_id, JobStage.name == name,
                       JobStage.state == "running")
                .values(state="interrupted")
            )
            row = JobStage(job_id=self.job_id, name=name, state="running")
            s.add(row)
            s.flush()
            row_id = row.id
        failpoint(self.failpoint, name)
        started = time.perf_counter()
        try:
            output = fn()
        except BaseException as exc:
            with self.store.session() as s:
                row = s.get(JobStage, row_id)
                row.state, row.error = "failed", str(exc)[:4000]
                row.finished_at, row.seconds = utcnow(), time.perf_counter() - started
            raise
        with self.store.session() as s:
            row = s.get(JobStage, row_id)
            row.state, row.output = "done", output
            row.finished_at, row.seconds = utcnow(), time.perf_counter() - started
            if on_done is not None:
                on_done(s, output)  # same transaction as the checkpoint: happens once
        return output


def failpoint(spec: str | None, point: str) -> None:
    """Fault injection (settings.failpoint): die here, as a crash or an OOM kill would."""
    if spec and spec == f"kill:{point}":
        log.warning("failpoint %s: killing this process", spec)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- helpers


def _record_format(model: str, fmt: str, well_formed: bool) -> Callable[[Session, dict], None]:
    def record(s: Session, _output: dict) -> None:
        stat = s.get(EditFormatStat, (model, fmt))
        if stat is None:
            stat = EditFormatStat(model=model, format=fmt, well_formed=0, malformed=0)
            s.add(stat)
        if well_formed:
            stat.well_formed += 1
        else:
            stat.malformed += 1

    return record


def _validation_json(result: ValidationResult) -> dict:
    return {
        "ok": result.ok,
        "summary": result.summary(),
        "checks": [
            {"name": c.name, "ok": c.ok, "skipped": c.skipped, "seconds": round(c.seconds, 2),
             "output": c.output[-2000:]}
            for c in result.checks
        ],
    }


def _output_tail(validation: dict, lines: int = 15) -> str:
    for check in reversed(validation.get("checks", [])):
        if check["name"] == "tests" and not check["skipped"]:
            return "\n".join(check["output"].rstrip().splitlines()[-lines:])
    return ""


def pr_body(
    *, requirement: str, requester: str | None, source: str, request_id: int,
    validation: dict, model: str, diff_stat: str, revisions: list[str], issue: int | None = None,
) -> str:
    """The pull request's description (decided here; the forge only sends it)."""
    lines = []
    if issue is not None:
        lines.append(f"Closes #{issue}\n")
    who = f" by {requester}" if requester else ""
    lines.append(f"Requested{who} via {source} (codeloop request #{request_id}).\n")
    lines.append("## Requirement\n")
    lines.extend("> " + line if line else ">" for line in requirement.strip().splitlines())
    lines.append("\n## Validation\n")
    lines.append(verdict.markdown(validation))
    tail = _output_tail(validation)
    if tail:
        lines.append(f"\n```\n{tail}\n```")
    if revisions:
        lines.append("\n## Revisions\n")
        lines.extend(f"- {r}" for r in revisions)
    lines.append(f"\n## Changes\n\n```\n{diff_stat}\n```")
    lines.append(f"\n---\nWritten by codeloop with model `{model}`. Review it as any pull request: "
                 "request changes and codeloop revises this branch.")
    return "\n".join(lines)


# ---------------------------------------------------------------- the pipeline


def run_job(job_id: int, ports: Ports) -> dict:
    """Run (or resume) one job to its end. Returns the job's result for the caller.

    Raises JobFailed with a message for the requester, or JobCancelled.
    """
    settings, store = ports.settings, ports.store
    with store.session() as s:
        job = s.get(Job, job_id)
        request = job.request
        kind, feedback, pr_id = job.kind, job.feedback, job.pull_request_id
        req = {
            "id": request.id, "repo": request.repo, "requirement": request.requirement,
            "requester": request.requester, "source": request.source,
            "issue": (request.reply_to or {}).get("issue"),
        }
        created_at = job.created_at
    stages = Stages(store, job_id, ports.notifier, settings.failpoint)

    # 1. workspace ------------------------------------------------------------
    try:
        info = ports.forge.check_repository(req["repo"]) if kind == "create" else None
    except ForgeError as exc:
        raise JobFailed(str(exc)) from exc
    if info is None:
        info = _repo_info_for_revision(ports, req["repo"])

    def stage_workspace() -> dict:
        config_text = _trusted_config_text(ports.forge, info)
        if kind == "revise":
            with store.session() as s:
                pr = s.get(PullRequest, pr_id)
                if pr.state != "open":
                    raise JobFailed(f"pull request #{pr.number} is {pr.state}; nothing to revise")
                branch, base_branch = pr.branch, pr.base_branch
            if ports.forge.branch_head(info, branch) is None:
                raise JobFailed(f"branch {branch} was deleted; the revision was dropped")
            _, sha = workspace.prepare(settings.workspaces_dir, job_id, info.clone_url, branch)
            return {"base_branch": base_branch, "start_sha": sha, "branch": branch,
                    "config": config_text}
        base_branch = _load_config(config_text).base_branch or info.default_branch
        _, sha = workspace.prepare(settings.workspaces_dir, job_id, info.clone_url, base_branch)
        return {"base_branch": base_branch, "start_sha": sha, "config": config_text}

    ws = stages.run("workspace", stage_workspace, f"reading {Path(req['repo']).name}")
    workdir, _ = workspace.prepare(settings.workspaces_dir, job_id, info.clone_url, ws["start_sha"])
    # The configuration the job started with, from the default branch: never the PR branch's,
    # which a generated change could have edited (docs/architecture.md, "Trust boundaries").
    config = _load_config(ws["config"] if "config" in ws else _trusted_config_text(ports.forge, info))
    if config.test_command and settings.sandbox.isolation != "none":
        found = probe(settings.sandbox)
        if not found.ok:
            raise JobFailed(f"this worker cannot run the repository's tests safely, so nothing "
                            f"was generated: {found.detail}")
    env_dir = _setup_environment(stages, ports, config, workdir, ws["start_sha"])
    model_name = config.model or _serving_model(settings, store, job_id)
    # The format follows the model family: an adapter answers like its base model.
    fmt = config.edit_format or default_format_for(config.model or settings.backend.model)

    # 2-3. context and prompt -----------------------------------------------
    query = req["requirement"] + ("\n" + feedback if feedback else "")

    def stage_context() -> dict:
        index = ctx.RepoIndex(settings.index_dir / _slug(info.repo))
        stats = index.update(workdir)
        ranked = index.rank(query, k=settings.pipeline.context_files * 2)
        if ranked:  # weakly related files distract small models more than they help
            floor = ranked[0].score * settings.pipeline.context_min_score
            ranked = [r for r in ranked if r.score >= floor]
        preferred = _pr_paths(store, pr_id) if kind == "revise" else []
        paths = preferred + [r.path for r in ranked if r.path not in preferred]
        return {"paths": paths[: settings.pipeline.context_files * 2], "files_indexed": stats.files_total,
                "files_read": stats.files_read}

    found = stages.run("context", stage_context, "finding the files that matter")

    def stage_prompt() -> dict:
        return _plan_prompt(ports, workdir, found["paths"], req["requirement"], feedback, fmt,
                            model_name)

    plan = stages.run("prompt", stage_prompt, "writing the prompt")
    proof_spec = _requirement_test_spec(ports, stages, kind, req["requirement"], feedback,
                                        workdir, plan, model_name)

    # 4-6. generate, parse, validate; retry with the errors, each retry different ----------
    attempts = settings.pipeline.max_attempts
    n = settings.pipeline.candidates_for(settings.backend.kind)
    good: dict | None = None
    last_reason = ""
    history: list[dict] = []
    for attempt in range(1, attempts + 1):
        if attempt == 1:
            current, strategy = Prompt.from_json(plan), _first_strategy(settings, plan)
        else:
            strategy = _retry_strategy(settings, plan, history, attempt)

            def stage_retry_prompt() -> dict:
                retry, report = _attempt_prompt(ports, plan, strategy["mode"], req["requirement"],
                                                feedback, history[-1])
                return {**retry.to_json(), "packing": report, "strategy": strategy}

            planned = stages.run(f"prompt-{attempt}", stage_retry_prompt,
                                 f"rewriting the prompt (attempt {attempt}/{attempts})")
            current, strategy = Prompt.from_json(planned), planned["strategy"]
        gen = stages.run(
            f"generate-{attempt}",
            lambda: {**(_generate_candidates(ports, current, model_name, n) if n > 1
                        else _generate(ports, current, model_name, strategy["temperature"])),
                     "strategy": strategy},
            f"generating (attempt {attempt}/{attempts})"
            + (f", {n} candidates" if n > 1 else ""),
        )
        answers = [_answer_in_format(plan, strategy["mode"], text, workdir, ws["start_sha"])
                   for text in _texts(gen)]
        check = stages.run(
            f"validate-{attempt}",
            lambda: _validate_candidates(ports, workdir, ws["start_sha"], answers, config,
                                         proof_spec, history, env_dir),
            f"validating (attempt {attempt}/{attempts})",
            on_done=_record_candidates(job_id, attempt, current, gen, answers),
        )
        chosen = check.get("chosen", 0)
        answer, afmt = answers[chosen]
        history.append({"attempt": attempt, "mode": strategy["mode"],
                        "raw": _texts(gen)[chosen],
                        "sha": check.get("answer_sha") or _answer_sha(answer), **check})
        if check["ok"]:
            good = {**check, "text": answer, "model": gen["model"], "attempt": attempt,
                    "format": afmt}
            break
        last_reason = check["reason"]
        if not check.get("retry", True):
            break
    if good is None:
        raise JobFailed(f"no valid change after {attempt} attempt(s): {last_reason}")

    # 7. forge: commit, push, pull request ---------------------------------------
    try:
        published = stages.run(
            "publish",
            lambda: _publish(ports, job_id, kind, req, info, ws, workdir, good,
                             good.get("format", fmt), config, created_at, pr_id),
            "opening the pull request" if kind == "create" else "pushing the revision",
        )
    except ForgeError as exc:
        raise JobFailed(str(exc)) from exc
    workspace.remove(settings.workspaces_dir, job_id)
    return published


def _trusted_config_text(forge: Forge, info: RepoInfo) -> str | None:
    """`.codeloop.yml` as the default branch has it: the one place configuration comes from."""
    return forge.read_file(info, info.default_branch, ".codeloop.yml")


def _load_config(text: str | None) -> RepoConfig:
    try:
        return parse_repo_config(text)
    except RepoConfigError as exc:
        raise JobFailed(str(exc)) from exc


def _serving_model(settings: Settings, store: Store, job_id: int) -> str:
    """The promoted model version (or, for canary jobs, the one before it), else the default."""
    from training.registry import serving_model

    return serving_model(settings, store, job_id)


def _slug(repo: str) -> str:
    """The index directory's name: the same for a repository in every process."""
    return git.slugify(repo, limit=80) + "-" + hashlib.sha256(repo.encode()).hexdigest()[:12]


def _prefill(settings: Settings, fmt: str) -> bool:
    mode = settings.pipeline.prefill
    if mode == "off" or fmt != "whole":
        return False
    if settings.backend.kind == "openai" and not settings.backend.supports_prefill:
        return False
    return True


def _prefill_target(docs: list[ContextDoc]) -> ContextDoc | None:
    """The best-ranked file that is not a test: where a small model's change most likely goes."""
    for doc in docs:
        name = Path(doc.path).name
        if not (name.startswith("test_") or name.endswith("_test.py") or "/tests/" in f"/{doc.path}"):
            return doc
    return docs[0] if docs else None


def _generate(ports: Ports, prompt: Prompt, model_name: str,
              temperature: float | None = None) -> dict:
    settings = ports.settings
    backend = ports.backend()
    params = GenerationParams(
        max_tokens=settings.backend.max_new_tokens,
        temperature=settings.backend.temperature if temperature is None else temperature,
        stop=prompt.stop,
        prefix=prompt.prefix,
        model=model_name,
    )
    try:
        gen = backend.generate(prompt.messages, params)
    except BackendError as exc:
        if exc.retryable:
            raise BackendUnavailable(str(exc)) from exc
        raise JobFailed(f"the model backend failed: {exc}") from exc
    text = gen.text
    if prompt.stop and gen.finish_reason == "stop" and "```" in prompt.stop:
        text = text.rstrip() + "\n```\n"  # a stop string ended the prefilled file
    return {
        "text": text, "model": gen.model, "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens, "seconds": round(gen.seconds, 3),
        "finish_reason": gen.finish_reason,
    }


def _apply_and_validate(
    ports: Ports, workdir: Path, start_sha: str, answer: str, fmt: str, config: RepoConfig,
    proof_spec: dict | None = None,
    env_dir: Path | None = None,
) -> dict:
    workspace.reset(workdir, start_sha)
    parsed = parse_edits(answer, fmt)
    if not parsed.edits:
        problems = "; ".join(parsed.problems) or "the answer contained no file edits"
        return {"ok": False, "reason": f"the model's answer had no parsable edit ({problems})",
                "changed": [], "problems": parsed.problems}
    try:
        changed = apply_edits(parsed.edits, workdir, config)
    except EditRejected as exc:
        # A refused edit (protected path, outside the repository) is not retried: the
        # requirement itself asked for it, and asking again invites the same answer. A
        # SEARCH block that did not match is a model slip: retried with the error.
        return {"ok": False, "reason": str(exc), "changed": [], "retry": not exc.refused,
                "refused": exc.refused, "problems": parsed.problems}
    if not changed:
        return {"ok": False, "reason": "the model's edit changed nothing", "changed": [],
                "problems": parsed.problems}
    diff_lines = sum(len(v) for v in changed_lines.changed_lines(workdir, start_sha,
                                                                  changed).values())
    change = _change_diff(workdir, start_sha, changed)
    blobs = git.blob_ids(workdir, changed)  # what was validated is what may be pushed
    try:
        result = validate(
            workdir, changed, config.test_command, ports.settings.sandbox,
            secrets=ports.settings.secret_values(), env_dir=env_dir,
        )
    except SandboxError as exc:
        raise JobFailed(str(exc)) from exc
    out = _validation_json(result)
    ok, reason = result.ok, ("" if result.ok else result.failures_text())
    # Requirement tests run even when an existing test failed: candidates are ranked by them
    # first, and the model's retry reads both. Not after a syntax or lint failure.
    lint_ok = all(c.ok or c.skipped for c in result.checks if c.name != "tests")
    if lint_ok and proof_spec is not None:
        proof = _prove(ports, workdir, start_sha, parsed.edits, changed, config, proof_spec,
                       env_dir)
        out["proof"] = proof
        if not proof["ok"]:
            ok, reason = False, (reason + "\n\n" + reqtests.failures_text(proof)).strip()
            out["ok"] = False
    out["verdict"] = verdict.line(out)
    workspace.reset(workdir, start_sha)
    return {"ok": ok, "reason": reason, "changed": changed, "validation": out,
            "problems": parsed.problems, "diff_lines": diff_lines, "blobs": blobs,
            "diff": change}


# ---------------------------------------------------------------- best of N


def _texts(gen: dict) -> list[str]:
    return [c["text"] for c in gen["candidates"]] if "candidates" in gen else [gen["text"]]


def _generate_candidates(ports: Ports, prompt: Prompt, model_name: str, n: int) -> dict:
    """N answers to one prompt: one batched request where the backend takes `n` (the OpenAI
    API), else N generations, the first at the configured temperature and the rest sampled."""
    settings = ports.settings
    backend = ports.backend()
    params = GenerationParams(
        max_tokens=settings.backend.max_new_tokens,
        temperature=max(settings.backend.temperature, settings.pipeline.candidate_temperature),
        stop=prompt.stop, prefix=prompt.prefix, model=model_name,
    )
    try:
        if hasattr(backend, "generate_n"):
            gens = backend.generate_n(prompt.messages, params, n)
        else:
            first = GenerationParams(**{**params.__dict__,
                                        "temperature": settings.backend.temperature})
            gens = [backend.generate(prompt.messages, first if i == 0 else params)
                    for i in range(n)]
    except BackendError as exc:
        if exc.retryable:
            raise BackendUnavailable(str(exc)) from exc
        raise JobFailed(f"the model backend failed: {exc}") from exc
    candidates = []
    for gen in gens:
        text = gen.text
        if prompt.stop and gen.finish_reason == "stop" and "```" in prompt.stop:
            text = text.rstrip() + "\n```\n"
        candidates.append({"text": text, "completion_tokens": gen.completion_tokens,
                           "finish_reason": gen.finish_reason})
    return {
        "text": candidates[0]["text"], "model": gens[0].model,
        "prompt_tokens": gens[0].prompt_tokens,
        "completion_tokens": sum(g.completion_tokens for g in gens),
        "seconds": round(max(g.seconds for g in gens) if hasattr(backend, "generate_n")
                         else sum(g.seconds for g in gens), 3),
        "finish_reason": gens[0].finish_reason, "candidates": candidates,
    }


def _score(check: dict) -> list:
    """The ranking key, best highest: requirement tests, then existing tests, then lint, then
    the smaller diff."""
    validation = check.get("validation") or {}
    checks = {c["name"]: c for c in validation.get("checks", [])}

    def passed(name: str) -> int:
        c = checks.get(name)
        return int(c is not None and (c["ok"] or c["skipped"]))

    proof = validation.get("proof") or {}
    req = sum(1 for k in proof.get("requirement_tests", []) if k.get("change") == "passed")
    return [int(check["ok"]), req, passed("tests"), passed("syntax") + passed("ruff"),
            -check.get("diff_lines", 10**6)]


def _validate_candidates(
    ports: Ports, workdir: Path, start_sha: str, answers: list[tuple[str, str]],
    config: RepoConfig, proof_spec: dict | None, history: list[dict],
    env_dir: Path | None = None,
) -> dict:
    """Validate every candidate — an (answer, edit format) pair — in parallel sandboxes, each
    in its own clone, within `pipeline.candidate_concurrency`; an answer an earlier attempt
    gave is not validated again. Returns the best one's check with all results."""
    if len(answers) == 1:
        answer, fmt = answers[0]
        check = _validate_unless_repeated(ports, workdir, start_sha, answer, fmt, config,
                                          history, env_dir, proof_spec)
        return {**check, "chosen": 0, "scores": [_score(check)]}
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> dict:
        clone = workdir.parent / f"{workdir.name}-candidate-{i}"
        shutil.rmtree(clone, ignore_errors=True)
        git.git(workdir.parent, "clone", "--quiet", "--shared", "--no-checkout",
                str(workdir), str(clone))
        try:
            answer, fmt = answers[i]
            return _validate_unless_repeated(ports, clone, start_sha, answer, fmt, config,
                                             history, env_dir, proof_spec)
        finally:
            shutil.rmtree(clone, ignore_errors=True)

    with ThreadPoolExecutor(max_workers=ports.settings.pipeline.candidate_concurrency) as pool:
        checks = list(pool.map(one, range(len(answers))))
    scores = [_score(c) for c in checks]
    best = max(range(len(checks)), key=lambda i: (scores[i], -i))
    others = [
        {"index": i, "ok": c["ok"], "score": scores[i], "reason": c.get("reason", "")[-1500:],
         "validation": c.get("validation", {})}
        for i, c in enumerate(checks)
    ]
    return {**checks[best], "chosen": best, "scores": scores, "candidates": others}


def _record_candidates(
    job_id: int, attempt: int, prompt: Prompt, gen: dict, answers: list[tuple[str, str]],
) -> Callable[[Session, dict], None]:
    """Store every candidate (the model's text, as answered to `prompt`) and its results, in
    the validate checkpoint's transaction."""
    def record(s: Session, output: dict) -> None:
        texts = _texts(gen)
        chosen = output.get("chosen", 0)
        results = output.get("candidates") or [
            {"index": 0, "ok": output["ok"], "score": (output.get("scores") or [[]])[0],
             "reason": output.get("reason", ""), "validation": output.get("validation", {})}]
        for r in results:
            i = r["index"]
            s.add(Candidate(
                job_id=job_id, attempt=attempt, idx=i, prompt=prompt.to_json(), text=texts[i],
                model=gen["model"], ok=bool(r["ok"]), chosen=bool(output["ok"] and i == chosen),
                score=list(r["score"]), reason=(r.get("reason") or None),
                validation=r.get("validation") or {},
            ))
        answer, fmt = answers[chosen]
        _record_format(gen["model"], fmt, parse_edits(answer, fmt).well_formed)(s, output)

    return record


# ---------------------------------------------------------------- requirement tests


def _requirement_test_spec(
    ports: Ports, stages: Stages, kind: str, requirement: str, feedback: str | None,
    workdir: Path, plan: dict, model_name: str,
) -> dict | None:
    """The requirement tests' sources for this job: stated examples, else a model-written test.

    A revision looks for examples in the review feedback. The model's test is a checkpointed
    stage (a resumed job does not ask again).
    """
    mode = ports.settings.pipeline.requirement_tests_for(ports.settings.backend.kind)
    if mode == "off":
        return None
    text = feedback if kind == "revise" else requirement
    examples = reqtests.extract_examples(text or "")
    spec: dict = {"examples": [e.__dict__ for e in examples], "model_test": None, "notes": []}
    if examples or mode != "auto" or kind != "create":
        if not examples:
            spec["notes"].append("the requirement states no example" if kind == "create" else
                                 "the review states no example")
        return spec

    def stage_test() -> dict:
        docs = [(d["path"], d["text"]) for d in plan["plan"]["docs"]]
        where = reqtests.test_dir(workdir)
        messages = reqtests.model_test_prompt(requirement, docs, where)
        # Start the answer with the file's header and stop at its closing fence: a small
        # model then writes the test, not an essay (and costs one short generation).
        prefill = _prefill(ports.settings, "whole")
        params = GenerationParams(
            max_tokens=ports.settings.backend.max_new_tokens,
            temperature=ports.settings.backend.temperature, model=model_name,
            prefix=f"{where}test_requirement.py\n```python\n" if prefill else "",
            stop=("```",) if prefill else (),
        )
        try:
            gen = ports.backend().generate(messages, params)
        except BackendError as exc:
            if exc.retryable:
                raise BackendUnavailable(str(exc)) from exc
            return {"test": None, "why": f"the model backend failed: {exc}"}
        text = gen.text
        if prefill and gen.finish_reason == "stop" and text.count("```") == 1:
            text = text.rstrip() + "\n```\n"
        test, why = reqtests.parse_model_test(text, workdir)
        return {"test": test, "why": why}

    written = stages.run("requirement-test", stage_test, "writing a test of the requirement")
    spec["model_test"] = written["test"]
    if written["test"] is None:
        spec["notes"].append(f"the requirement states no example and {written['why']}")
    return spec


def _prove(
    ports: Ports, workdir: Path, start_sha: str, edits, changed: list[str], config: RepoConfig,
    spec: dict, env_dir: Path | None = None,
) -> dict:
    examples = [reqtests.Example(**e) for e in spec["examples"]]

    def apply() -> None:
        apply_edits(edits, workdir, config)

    proof = reqtests.prove(
        workdir, start_sha, apply, changed, examples=examples, model_test=spec["model_test"],
        test_command=config.test_command, settings=ports.settings.sandbox,
        secrets=ports.settings.secret_values(), env_dir=env_dir,
    )
    proof["notes"] = spec["notes"] + proof["notes"]
    return proof


def _add_requirement_tests(workdir: Path, validation: dict) -> list[str]:
    """Write the kept requirement tests into the tree being committed; their paths."""
    added = []
    for path, text in ((validation.get("proof") or {}).get("files") or {}).items():
        target = (workdir / path).resolve()
        if not target.is_relative_to(workdir.resolve()) or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        added.append(path)
    return added



# ---------------------------------------------------- the repository's own environment


def _setup_environment(stages: Stages, ports: Ports, config: RepoConfig, workdir: Path,
                       sha: str) -> Path | None:
    """Build (or reuse) the environment of `.codeloop.yml` `setup:`, before any generation."""
    if not config.setup:
        return None
    from bot.environments import SetupFailed, ensure
    from bot.sandbox import SandboxUnavailable

    def stage_setup() -> dict:
        try:
            env = ensure(ports.settings, config, workdir, sha, ports.settings.secret_values())
        except SetupFailed as exc:
            raise JobFailed(str(exc)) from exc
        except SandboxUnavailable as exc:
            raise JobFailed(f"the repository's set-up was not run: {exc}") from exc
        return env.to_json()

    done = stages.run("setup", stage_setup, "setting up the repository's environment")
    path = Path(done["path"])
    if not path.is_dir():  # evicted since the checkpoint: build it again
        from bot.environments import ensure

        env = ensure(ports.settings, config, workdir, sha, ports.settings.secret_values())
        path = env.path
    return path


# ---------------------------------------------------- prompts that fit, retries that differ


def _context_window(ports: Ports, model_name: str) -> int:
    """The model's context in tokens: as the backend reports it, else the setting."""
    backend = ports.backend()
    window = getattr(backend, "context_window", None)
    if window is not None:
        try:
            return int(window(model_name))
        except BackendError as exc:
            if exc.retryable:
                raise BackendUnavailable(str(exc)) from exc
            raise JobFailed(f"the model backend failed: {exc}") from exc
    return ports.settings.backend.context_tokens or 2048


def _prompt_budget(settings: Settings, window: int) -> int:
    """Prompt tokens: the window less the answer's room and a margin for rough counts."""
    answer = settings.backend.max_new_tokens
    budget = window - answer - 16 - window // 32
    if budget < 256:
        raise JobFailed(
            f"the model's context is {window} tokens; after {answer} for the answer "
            f"(backend.max_new_tokens) only {budget} are left for the prompt: lower "
            "backend.max_new_tokens or serve the model with a longer context"
        )
    return budget


def _read_docs(workdir: Path, paths: list[str], limit: int) -> list[ContextDoc]:
    docs = []
    for path in paths:
        if len(docs) >= limit:
            break
        try:
            data = (workdir / path).read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        docs.append(ContextDoc(path, data.decode("utf-8", errors="replace")))
    return docs


def _plan_prompt(ports: Ports, workdir: Path, paths: list[str], requirement: str,
                 feedback: str | None, fmt: str, model_name: str) -> dict:
    """The first attempt's prompt, and the plan later attempts are built from.

    The plan is data in the stage record: the packed context documents, the token budget,
    and the ways the model may be asked for its change (`modes`, best first):
    - definition: the answer is started with the head of the one function the requirement
      names (or the file's only stub); its body is swapped in by name;
    - whole-prefill: the answer is started with the whole target file (small models);
      only when the whole file fits;
    - whole: whole files, never one that had to be cut for the budget;
    - search_replace: always possible.
    """
    settings = ports.settings
    backend = ports.backend()
    window = _context_window(ports, model_name)
    budget = _prompt_budget(settings, window)
    docs = _read_docs(workdir, paths, settings.pipeline.context_files)
    plan: dict = {"window": window, "budget": budget, "format": fmt, "target": None,
                  "definition": None, "modes": [], "docs": [d.__dict__ for d in docs]}
    target = _prefill_target(docs) if _prefill(settings, fmt) else None
    modes: list[str] = []
    if target is not None:
        plan["target"] = target.path
        # A revision changes what its review asks for, not what the first request named.
        wanted = feedback or requirement
        found = find_definition(target.text, wanted) if target.path.endswith(".py") else None
        if found is not None:
            # The answer starts inside the body, indented: the model writes code, not a fence.
            lines = target.text.splitlines()
            body = lines[found.body - 1] if found.body <= found.end else ""
            indent = body[: len(body) - len(body.lstrip())] if body.strip() else (
                found.indent + "    ")
            head = found.head(target.text)
            # A stub whose docstring shows results is to return one: starting the body with
            # `return ` gets a small model writing code where it would close the block.
            if found.stub and (">>>" in head or "return" in head.lower()):
                indent += "return "
            plan["definition"] = {"path": target.path, **found.__dict__, "head": head + indent}
            modes.append("definition")
        # The file goes in twice (shown, then as the answer's start): offered only whole, and
        # never when one definition is to change (a continued file can only add a second).
        if found is None and backend.count_tokens(target.text) * 2 < budget:
            try:
                _, whole = _attempt_prompt(ports, plan, "whole-prefill", requirement, feedback,
                                           None)
            except JobFailed:
                whole = {"truncated": [target.path], "dropped": []}
            if target.path not in whole["truncated"] + whole["dropped"]:
                modes.append("whole-prefill")
                plan["target_text"] = target.text
        if found is None and "whole-prefill" not in modes and target.path.endswith(".py"):
            # Too big to rewrite: the answer continues the file's last lines, and what the
            # model writes is appended (new code; a clash with a name there fails ruff).
            tail = "".join(target.text.splitlines(keepends=True)[-30:]).rstrip("\n")
            plan["append_prefix"] = f"{target.path}\n```python\n{tail}\n\n\n"
            modes.append("append")
    elif fmt == "whole":
        _, whole = _attempt_prompt(ports, plan, "whole", requirement, feedback, None)
        if not whole["truncated"]:  # a file cut off is never offered for a rewrite
            modes.append("whole")
    modes.append("search_replace")
    plan["modes"] = modes
    prompt, report = _attempt_prompt(ports, plan, modes[0], requirement, feedback, None)
    plan["docs"] = report.pop("docs")
    return {**prompt.to_json(), "plan": plan, "packing": report}


_MODE_FORMAT = {"definition": "whole", "whole-prefill": "whole", "whole": "whole",
                "append": "whole", "search_replace": "search_replace"}


def _attempt_prompt(ports: Ports, plan: dict, mode: str, requirement: str,
                    feedback: str | None, previous: dict | None) -> tuple[Prompt, dict]:
    """One attempt's prompt in `mode`, packed into the plan's budget (see fit_prompt)."""
    backend = ports.backend()
    plan = plan.get("plan", plan)
    docs = [ContextDoc(**d) for d in plan["docs"]]
    efmt = _MODE_FORMAT[mode]
    kwargs: dict = {"requirement": requirement, "edit_format": efmt,
                    "format_rules": describe_format(efmt), "feedback": feedback}
    target = plan.get("target")
    # The file most likely changed is cut before it is dropped.
    keep: tuple[str, ...] = (target,) if target else tuple(d.path for d in docs[:1])
    if mode == "whole-prefill" and target:
        whole = next((d for d in docs if d.path == target and not d.truncated), None)
        if whole is None:  # cut for another mode's prompt: put it back whole
            whole = ContextDoc(target, plan["target_text"])
            docs = [whole] + [d for d in docs if d.path != target]
        kwargs["prefill_file"] = whole
        keep = (target,)
    elif mode == "append":
        kwargs.update(prefix=plan["append_prefix"], stop=("```", "\n\n\n"),
                      note=f"Write only the new code; it is added at the end of {target}.")
        keep = (target,)
    elif mode == "definition":
        d = plan["definition"]
        head = d["head"]
        stop = ("```", "\n\n\n")
        if not d["indent"]:
            stop += ("\ndef ", "\nclass ", "\n@", "\nif __name__")
        kwargs.update(prefix=f"{d['path']}\n```python\n{head}", stop=stop,
                      note=f"Write the new version of `{d['name']}` in {d['path']} only: it "
                           "replaces the current definition; everything else stays as it is.")
        keep = (d["path"],)
    if previous is not None:
        kwargs["previous_answer"] = previous.get("raw") or previous.get("answer") or ""
        kwargs["errors"] = _actionable(previous.get("reason") or "it failed")
    try:
        fitted = fit_prompt(budget_tokens=plan["budget"], count_tokens=backend.count_tokens,
                            context=docs, keep=keep, **kwargs)
    except PromptTooLong as exc:
        raise JobFailed(f"{exc}: the model's context is too small for this repository") from exc
    report = fitted.report()
    report["docs"] = [d.__dict__ for d in fitted.docs]
    return fitted.prompt, report


def _first_strategy(settings: Settings, plan: dict) -> dict:
    return {"mode": plan["plan"]["modes"][0], "temperature": settings.backend.temperature,
            "shown": "requirement and context", "why": "first attempt"}


def _retry_strategy(settings: Settings, plan: dict, history: list[dict], attempt: int) -> dict:
    """How retry `attempt` differs from the attempts before it: it shows the last failure
    (with hints the model can act on), samples hotter each time and, once a way of asking
    has failed twice or repeated itself, asks another way."""
    modes = plan["plan"]["modes"]
    last = history[-1]
    mode = last["mode"]
    temperature = round(min(1.0, max(settings.backend.temperature, 0.4 * (attempt - 1))), 2)
    why = [f"shows attempt {last['attempt']}'s errors and answer",
           f"temperature {temperature}"]
    same = 0
    for h in reversed(history):
        if h["mode"] != mode:
            break
        same += 1
    if last.get("duplicate_of") or same >= 2:
        others = [m for m in modes if m != mode]
        tried = {h["mode"] for h in history}
        fresh = [m for m in others if m not in tried] or others
        if fresh:
            mode = fresh[0]
            why.append(f"asks another way: {mode}")
    return {"mode": mode, "temperature": temperature, "shown": "errors and previous answer",
            "why": "; ".join(why)}


def _actionable(reason: str) -> str:
    """The failure, with a line on what to do for the failures small models make most."""
    hints = []
    if "F811" in reason or "edefinition of unused" in reason:
        hints.append("Do not write a second definition with the same name: change the one "
                     "that is there.")
    if "(truncated)" in reason:
        hints.append("Write only what you change; never copy the '... (truncated)' line.")
    if "SEARCH text was not found" in reason:
        hints.append("Copy the SEARCH lines exactly from the file shown above.")
    if "SyntaxError" in reason or "invalid syntax" in reason:
        hints.append("Check the indentation and that every bracket and string is closed.")
    if "repeats attempt" in reason:
        hints.append("That answer was the same as an earlier one: try a different approach.")
    if "no parsable edit" in reason:
        hints.append("Answer in the format the instructions give, with the file's path.")
    return reason.strip() + ("\n\nWhat to do:\n" + "\n".join(f"- {h}" for h in hints)
                             if hints else "")


def _answer_in_format(plan: dict, mode: str, text: str, workdir: Path,
                      start_sha: str) -> tuple[str, str]:
    """The answer as an edit in a format the parser reads, and that format. A definition
    written after its prefilled head becomes a search/replace of that one definition."""
    if mode in ("append", "definition"):
        start = (plan["plan"]["append_prefix"] if mode == "append" else
                 f"{plan['plan']['definition']['path']}\n```python\n"
                 f"{plan['plan']['definition']['head']}")
        if not text.startswith(start):  # a backend that ignored the prefill: a whole answer
            return text, "whole"
    if mode == "append":
        prefix = plan["plan"]["append_prefix"]
        added = text[len(prefix):]
        added = added.split("```", 1)[0].strip("\n")
        path = plan["plan"]["target"]
        if not added.strip():
            return "", "search_replace"
        return (f"{path}\n<<<<<<< SEARCH\n=======\n\n\n{added}\n>>>>>>> REPLACE\n",
                "search_replace")
    if mode != "definition":
        return text, _MODE_FORMAT[mode]
    from inference.edits import Definition

    d = plan["plan"]["definition"]
    original = git.show_file(workdir, start_sha, d["path"]) or ""
    fields = {k: d[k] for k in ("name", "start", "body", "end", "indent", "stub", "kind")}
    written = text.split("\n", 2)[2] if text.count("\n") >= 2 else ""
    return definition_answer(d["path"], original, Definition(**fields), written), "search_replace"


def _answer_sha(answer: str) -> str:
    norm = "\n".join(line.rstrip() for line in answer.strip().splitlines())
    return hashlib.sha256(norm.encode()).hexdigest()[:16]


def _validate_unless_repeated(ports: Ports, workdir: Path, start_sha: str, answer: str,
                              fmt: str, config: RepoConfig, history: list[dict],
                              env_dir: Path | None = None,
                              proof_spec: dict | None = None) -> dict:
    """Validation of an answer no earlier attempt gave; a repeat is recorded, not re-run."""
    sha = _answer_sha(answer)
    for h in history:
        if h.get("sha") == sha:
            return {"ok": False, "changed": [], "problems": [], "answer_sha": sha,
                    "duplicate_of": h["attempt"],
                    "reason": f"the answer repeats attempt {h['attempt']}'s, which was not "
                              f"validated again; it failed with: {h['reason'][-1500:]}"}
    return {**_apply_and_validate(ports, workdir, start_sha, answer, fmt, config, proof_spec,
                                  env_dir),
            "answer_sha": sha}


def _change_diff(workdir: Path, start_sha: str, changed: list[str], limit: int = 8000) -> str:
    """The applied change as a unified diff (kept in the stage record; shown on retries)."""
    out = []
    for path in changed:
        old = (git.show_file(workdir, start_sha, path) or "").splitlines(keepends=True)
        try:
            new = (workdir / path).read_text(errors="replace").splitlines(keepends=True)
        except OSError:
            new = []
        out.extend(difflib.unified_diff(old, new, f"a/{path}", f"b/{path}"))
    return "".join(out)[:limit]


def _pr_paths(store: Store, pr_id: int | None) -> list[str]:
    if pr_id is None:
        return []
    with store.session() as s:
        pr = s.get(PullRequest, pr_id)
        paths: list[str] = []
        for rev in pr.revisions:
            for line in rev.diff.splitlines():
                if line.startswith("+++ b/"):
                    path = line[6:]
                    if path not in paths:
                        paths.append(path)
        return paths


def _repo_info_for_revision(ports: Ports, repo: str) -> RepoInfo:
    """Revisions push to the PR branch; the user's own checkout may be dirty meanwhile."""
    try:
        return ports.forge.check_repository(repo)
    except ForgeError:
        top = Path(repo)
        branch = git.current_branch(top) or "main"
        return RepoInfo(repo=str(top), clone_url=str(top), default_branch=branch)


def _publish(
    ports: Ports, job_id: int, kind: str, req: dict, info: RepoInfo, ws: dict, workdir: Path,
    good: dict, fmt: str, config: RepoConfig, created_at, pr_id: int | None,
) -> dict:
    store, forge = ports.store, ports.forge
    workspace.reset(workdir, ws["start_sha"])
    changed = apply_edits(parse_edits(good["text"], fmt).edits, workdir, config)
    tests_added = _add_requirement_tests(workdir, good.get("validation", {}))
    changed += tests_added
    git.git(workdir, "add", "--", *changed)
    title = _title(req["requirement"])
    # A deterministic commit (fixed dates from the job): a resumed publish makes the same
    # sha, so pushing again is a no-op rather than a second commit.
    stamp = created_at.strftime("%Y-%m-%dT%H:%M:%S+0000")
    message = (
        f"{title}\n\nRequested via {req['source']} (codeloop request #{req['id']}).\n\n"
        f"Codeloop-Job: {job_id}\nCodeloop-Model: {good['model']}\n"
    )
    if kind == "revise":
        message = f"Revise: address review feedback\n\nCodeloop-Job: {job_id}\nCodeloop-Model: {good['model']}\n"
    dates = {"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
    git.git(workdir, "commit", "--quiet", "--no-verify", "-F", "-", input=message, env=dates)
    head = git.rev(workdir, "HEAD")
    expected = dict(good.get("blobs") or git.blob_ids(workdir, changed))
    expected.update(git.blob_ids(workdir, tests_added))  # written just now from the proof
    try:
        git.verify_commit(workdir, ws["start_sha"], head, expected)
    except git.GitError as exc:
        raise JobFailed(str(exc)) from exc
    diff_text = git.diff(workdir, ws["start_sha"], head)
    stat = git.diff_stat(workdir, ws["start_sha"], head)

    if kind == "create":
        with store.session() as s:
            pr = s.scalar(select(PullRequest).where(PullRequest.request_id == req["id"]))
            branch = pr.branch if pr else _new_branch(s, forge.name, info.repo, req)
    else:
        branch = ws["branch"]
    forge.push_branch(info, workdir, branch, head)
    failpoint(ports.settings.failpoint, "publish:pushed")

    with store.session() as s:
        if kind == "create":
            pr = s.scalar(select(PullRequest).where(PullRequest.request_id == req["id"]))
            if pr is None:
                pr = PullRequest(
                    request_id=req["id"], forge=forge.name, repo=info.repo, branch=branch,
                    base_branch=ws["base_branch"], title=title, body="", model_version=good["model"],
                )
                s.add(pr)
                s.flush()
            trigger = "initial"
        else:
            pr = s.get(PullRequest, pr_id)
            trigger = "review"
        rev = s.scalar(select(Revision).where(Revision.job_id == job_id))
        if rev is None:
            rev = Revision(
                pull_request_id=pr.id, number=len(pr.revisions) + 1, job_id=job_id,
                commit_sha=head, diff=diff_text, diff_stat=stat,
                validation=good.get("validation", {}), model_version=good["model"], trigger=trigger,
            )
            s.add(rev)
            s.flush()
        pr_pk, number = pr.id, rev.number
    with store.session() as s:
        pr = s.get(PullRequest, pr_pk)
        total_stat = git.diff_stat(workdir, _merge_base(workdir, pr.base_branch, head), head)
        revs = [f"{r.number}: {r.commit_sha[:10]} ({r.trigger}, {verdict.line(r.validation)})"
                for r in pr.revisions]
        body = pr_body(
            requirement=req["requirement"], requester=req["requester"], source=req["source"],
            request_id=req["id"], validation=good.get("validation", {}), model=good["model"],
            diff_stat=total_stat, revisions=revs if len(revs) > 1 else [], issue=req["issue"],
        )
        if kind == "create" and pr.number is None:
            opened = forge.open_pull_request(
                info, branch=branch, base=pr.base_branch, title=pr.title, body=body, pr_id=pr.id
            )
            pr.number, pr.url = opened.number, opened.url
            failpoint(ports.settings.failpoint, "publish:opened")  # the forge has it; we don't
        pr.body = body
        pr.model_version = good["model"]
        return {
            "pull_request_id": pr.id, "number": pr.number, "url": pr.url, "branch": branch,
            "commit": head, "revision": number, "diff_stat": stat,
            "validation": good.get("validation", {}), "changed": good["changed"],
            "attempt": good["attempt"], "model": good["model"],
        }


def _new_branch(s: Session, forge: str, repo: str, req: dict) -> str:
    """`codeloop/<issue>-<slug>` (or `<request>` without an issue), unique per repository."""
    slug = git.slugify(req["requirement"])
    branch = f"codeloop/{req['issue'] or req['id']}-{slug}"
    taken = s.scalar(select(PullRequest.id).where(
        PullRequest.forge == forge, PullRequest.repo == repo, PullRequest.branch == branch))
    return branch if taken is None else f"{branch}-r{req['id']}"


def _merge_base(workdir: Path, base_branch: str, head: str) -> str:
    base = git.rev(workdir, f"origin/{base_branch}") or head
    return git.git(workdir, "merge-base", base, head).strip() or base


def _title(requirement: str) -> str:
    first = requirement.strip().splitlines()[0].strip()
    return first if len(first) <= 72 else first[:69].rstrip() + "…"
