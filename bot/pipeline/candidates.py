"""Stage `validate-N`: every candidate answer applied to its own clone and validated in the
sandbox (with the requirement tests), ranked, and recorded."""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from bot import changed_lines, git, reqtests, verdict, workspace
from bot.pipeline.base import JobFailed, Ports
from bot.pipeline.generate import answer_sha
from bot.pipeline.proof import prove
from bot.pipeline.results import Attempt, Check, Generation
from bot.ports import ValidationResult
from bot.settings import RepoConfig
from bot.store.models import Candidate, EditFormatStat
from bot.validate import SandboxError, validate
from inference.edits import EditRejected, apply_edits, parse_edits
from inference.prompts import Prompt


@dataclass(frozen=True)
class Validation:
    """What every candidate of one job is validated against."""

    ports: Ports
    workdir: Path
    start_sha: str
    config: RepoConfig
    proof_spec: dict | None  # the requirement tests (bot.pipeline.proof), None when off
    env_dir: Path | None  # the repository's own environment, if it has a `setup:`


def validate_candidates(v: Validation, answers: list[tuple[str, str]],
                        history: list[Attempt]) -> Check:
    """Validate every candidate — an (answer, edit format) pair — in parallel sandboxes, each
    in its own clone, within `pipeline.candidate_concurrency`; an answer an earlier attempt
    gave is not validated again. Returns the best one's check with all results."""
    if len(answers) == 1:
        answer, fmt = answers[0]
        check = _validate_unless_repeated(v, v.workdir, answer, fmt, history)
        return check.but(chosen=0, scores=[_score(check)])

    def one(i: int) -> Check:
        clone = v.workdir.parent / f"{v.workdir.name}-candidate-{i}"
        shutil.rmtree(clone, ignore_errors=True)
        git.git(v.workdir.parent, "clone", "--quiet", "--shared", "--no-checkout",
                str(v.workdir), str(clone))
        try:
            answer, fmt = answers[i]
            return _validate_unless_repeated(v, clone, answer, fmt, history)
        finally:
            shutil.rmtree(clone, ignore_errors=True)

    with ThreadPoolExecutor(max_workers=v.ports.settings.pipeline.candidate_concurrency) as pool:
        checks = list(pool.map(one, range(len(answers))))
    scores = [_score(c) for c in checks]
    best = max(range(len(checks)), key=lambda i: (scores[i], -i))
    others = [
        {"index": i, "ok": c.ok, "score": scores[i], "reason": c.reason[-1500:],
         "validation": c.validation or {}}
        for i, c in enumerate(checks)
    ]
    return checks[best].but(chosen=best, scores=scores, candidates=others)


def _score(check: Check) -> list:
    """The ranking key, best highest: requirement tests, then existing tests, then lint, then
    the smaller diff."""
    validation = check.validation or {}
    checks = {c["name"]: c for c in validation.get("checks", [])}

    def passed(name: str) -> int:
        c = checks.get(name)
        return int(c is not None and (c["ok"] or c["skipped"]))

    proof = validation.get("proof") or {}
    req = sum(1 for k in proof.get("requirement_tests", []) if k.get("change") == "passed")
    diff_lines = check.diff_lines if check.diff_lines is not None else 10**6
    return [int(check.ok), req, passed("tests"), passed("syntax") + passed("ruff"), -diff_lines]


def _validate_unless_repeated(v: Validation, workdir: Path, answer: str, fmt: str,
                              history: list[Attempt]) -> Check:
    """Validation of an answer no earlier attempt gave; a repeat is recorded, not re-run."""
    sha = answer_sha(answer)
    for h in history:
        if h.sha == sha:
            return Check(ok=False, changed=[], problems=[], answer_sha=sha,
                         duplicate_of=h.attempt,
                         reason=f"the answer repeats attempt {h.attempt}'s, which was not "
                                f"validated again; it failed with: {h.check.reason[-1500:]}")
    return apply_and_validate(v, workdir, answer, fmt).but(answer_sha=sha)


def apply_and_validate(v: Validation, workdir: Path, answer: str, fmt: str) -> Check:
    start_sha, config, env_dir = v.start_sha, v.config, v.env_dir
    workspace.reset(workdir, start_sha)
    parsed = parse_edits(answer, fmt)
    if not parsed.edits:
        problems = "; ".join(parsed.problems) or "the answer contained no file edits"
        return Check(ok=False, reason=f"the model's answer had no parsable edit ({problems})",
                     changed=[], problems=parsed.problems)
    try:
        changed = apply_edits(parsed.edits, workdir, config)
    except EditRejected as exc:
        # A refused edit (protected path, outside the repository) is not retried: the
        # requirement itself asked for it, and asking again invites the same answer. A
        # SEARCH block that did not match is a model slip: retried with the error.
        return Check(ok=False, reason=str(exc), changed=[], retry=not exc.refused,
                     refused=exc.refused, problems=parsed.problems)
    if not changed:
        return Check(ok=False, reason="the model's edit changed nothing", changed=[],
                     problems=parsed.problems)
    diff_lines = sum(len(lines) for lines in changed_lines.changed_lines(
        workdir, start_sha, changed).values())
    change = _change_diff(workdir, start_sha, changed)
    blobs = git.blob_ids(workdir, changed)  # what was validated is what may be pushed
    settings = v.ports.settings
    try:
        result = validate(
            workdir, changed, config.test_command, settings.sandbox,
            secrets=settings.secret_values(), env_dir=env_dir,
        )
    except SandboxError as exc:
        raise JobFailed(str(exc)) from exc
    out = validation_json(result)
    ok, reason = result.ok, ("" if result.ok else result.failures_text())
    # Requirement tests run even when an existing test failed: candidates are ranked by them
    # first, and the model's retry reads both. Not after a syntax or lint failure.
    lint_ok = all(c.ok or c.skipped for c in result.checks if c.name != "tests")
    if lint_ok and v.proof_spec is not None:
        proof = prove(settings, workdir, start_sha, parsed.edits, changed, config,
                      v.proof_spec, env_dir)
        out["proof"] = proof
        if not proof["ok"]:
            ok, reason = False, (reason + "\n\n" + reqtests.failures_text(proof)).strip()
            out["ok"] = False
    out["verdict"] = verdict.line(out)
    workspace.reset(workdir, start_sha)
    return Check(ok=ok, reason=reason, changed=changed, validation=out,
                 problems=parsed.problems, diff_lines=diff_lines, blobs=blobs, diff=change)


def validation_json(result: ValidationResult) -> dict:
    return {
        "ok": result.ok,
        "summary": result.summary(),
        "checks": [
            {"name": c.name, "ok": c.ok, "skipped": c.skipped, "seconds": round(c.seconds, 2),
             "output": c.output[-2000:]}
            for c in result.checks
        ],
    }


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


def record_candidates(
    job_id: int, attempt: int, prompt: Prompt, gen: Generation, answers: list[tuple[str, str]],
) -> Callable[[Session, dict], None]:
    """Store every candidate (the model's text, as answered to `prompt`) and its results, in
    the validate checkpoint's transaction, and whether the chosen answer was well formed."""
    def record(s: Session, output: dict) -> None:
        texts = gen.texts
        chosen = output.get("chosen", 0)
        results = output.get("candidates") or [
            {"index": 0, "ok": output["ok"], "score": (output.get("scores") or [[]])[0],
             "reason": output.get("reason", ""), "validation": output.get("validation", {})}]
        for r in results:
            i = r["index"]
            s.add(Candidate(
                job_id=job_id, attempt=attempt, idx=i, prompt=prompt.to_json(), text=texts[i],
                model=gen.model, ok=bool(r["ok"]), chosen=bool(output["ok"] and i == chosen),
                score=list(r["score"]), reason=(r.get("reason") or None),
                validation=r.get("validation") or {},
            ))
        answer, fmt = answers[chosen]
        _record_format(s, gen.model, fmt, parse_edits(answer, fmt).well_formed)

    return record


def _record_format(s: Session, model: str, fmt: str, well_formed: bool) -> None:
    stat = s.get(EditFormatStat, (model, fmt))
    if stat is None:
        stat = EditFormatStat(model=model, format=fmt, well_formed=0, malformed=0)
        s.add(stat)
    if well_formed:
        stat.well_formed += 1
    else:
        stat.malformed += 1
