"""Stages `context` (the files that matter) and `prompt` (the plan: what the model is shown
and the ways it may be asked), and the retries' prompts and strategies, each retry
different from the attempts before it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

from bot import git
from bot.pipeline.base import JobFailed, Ports, backend_failed
from bot.pipeline.results import Attempt, ContextFound, JobInput, Plan, PlannedPrompt, Strategy
from bot.ports import BackendError
from bot.settings import Settings
from bot.store.db import Store
from bot.store.models import PullRequest
from inference import context as ctx
from inference.edits import describe_format, find_definition
from inference.prompts import ContextDoc, Prompt, PromptTooLong, fit_prompt

# The edit format each way of asking is parsed in.
MODE_FORMAT = {"definition": "whole", "whole-prefill": "whole", "whole": "whole",
               "append": "whole", "search_replace": "search_replace"}


# ---------------------------------------------------------------- stage `context`


def find_context(ports: Ports, job: JobInput, workdir: Path, repo: str) -> ContextFound:
    """Stage `context`: index the checkout and rank its files against the request."""
    settings = ports.settings
    index = ctx.RepoIndex(settings.index_dir / slug(repo))
    stats = index.update(workdir)
    ranked = index.rank(job.query, k=settings.pipeline.context_files * 2)
    if ranked:  # weakly related files distract small models more than they help
        floor = ranked[0].score * settings.pipeline.context_min_score
        ranked = [r for r in ranked if r.score >= floor]
    preferred = _pr_paths(ports.store, job.pull_request_id) if job.kind == "revise" else []
    paths = preferred + [r.path for r in ranked if r.path not in preferred]
    return ContextFound(paths=paths[: settings.pipeline.context_files * 2],
                        files_indexed=stats.files_total, files_read=stats.files_read)


def slug(repo: str) -> str:
    """The index directory's name: the same for a repository in every process."""
    return git.slugify(repo, limit=80) + "-" + hashlib.sha256(repo.encode()).hexdigest()[:12]


def _pr_paths(store: Store, pr_id: int | None) -> list[str]:
    if pr_id is None:
        return []
    with store.session() as s:
        pr = s.get(PullRequest, pr_id)
        paths: list[str] = []
        for rev in pr.revisions:
            try:
                files = PatchSet(rev.diff)
            except UnidiffParseError:
                continue
            for pf in files:
                if not pf.is_removed_file and pf.path not in paths:
                    paths.append(pf.path)
        return paths


# ---------------------------------------------------------------- stage `prompt`


def prefill(settings: Settings, fmt: str) -> bool:
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


def _context_window(ports: Ports, model_name: str) -> int:
    """The model's context in tokens: as the backend reports it, else the setting."""
    backend = ports.backend()
    window = getattr(backend, "context_window", None)
    if window is not None:
        try:
            return int(window(model_name))
        except BackendError as exc:
            raise backend_failed(exc) from exc
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


def plan_prompt(ports: Ports, job: JobInput, workdir: Path, paths: list[str], fmt: str,
                model_name: str) -> PlannedPrompt:
    """Stage `prompt`: the first attempt's prompt, and the plan later attempts are built from.

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
    plan = Plan(window=window, budget=budget, format=fmt, docs=docs)
    target = _prefill_target(docs) if prefill(settings, fmt) else None
    modes: list[str] = []
    if target is not None:
        plan.target = target.path
        # A revision changes what its review asks for, not what the first request named.
        wanted = job.feedback or job.requirement
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
            plan.definition = {"path": target.path, **found.__dict__, "head": head + indent}
            modes.append("definition")
        # The file goes in twice (shown, then as the answer's start): offered only whole, and
        # never when one definition is to change (a continued file can only add a second).
        if found is None and backend.count_tokens(target.text) * 2 < budget:
            try:
                _, whole = attempt_prompt(ports, plan, "whole-prefill", job, None)
            except JobFailed:
                whole = {"truncated": [target.path], "dropped": []}
            if target.path not in whole["truncated"] + whole["dropped"]:
                modes.append("whole-prefill")
                plan.target_text = target.text
        if found is None and "whole-prefill" not in modes and target.path.endswith(".py"):
            # Too big to rewrite: the answer continues the file's last lines, and what the
            # model writes is appended (new code; a clash with a name there fails ruff).
            tail = "".join(target.text.splitlines(keepends=True)[-30:]).rstrip("\n")
            plan.append_prefix = f"{target.path}\n```python\n{tail}\n\n\n"
            modes.append("append")
    elif fmt == "whole":
        _, whole = attempt_prompt(ports, plan, "whole", job, None)
        if not whole["truncated"]:  # a file cut off is never offered for a rewrite
            modes.append("whole")
    modes.append("search_replace")
    plan.modes = modes
    prompt, report = attempt_prompt(ports, plan, modes[0], job, None)
    plan.docs = [ContextDoc(**d) for d in report.pop("docs")]  # the packed documents
    return PlannedPrompt(prompt=prompt, plan=plan, packing=report)


def attempt_prompt(ports: Ports, plan: Plan, mode: str, job: JobInput,
                   previous: Attempt | None) -> tuple[Prompt, dict]:
    """One attempt's prompt in `mode`, packed into the plan's budget (see fit_prompt), and
    the packing report (with the packed documents under "docs")."""
    backend = ports.backend()
    docs = list(plan.docs)
    efmt = MODE_FORMAT[mode]
    kwargs: dict = {"requirement": job.requirement, "edit_format": efmt,
                    "format_rules": describe_format(efmt), "feedback": job.feedback}
    target = plan.target
    # The file most likely changed is cut before it is dropped.
    keep: tuple[str, ...] = (target,) if target else tuple(d.path for d in docs[:1])
    if mode == "whole-prefill" and target:
        whole = next((d for d in docs if d.path == target and not d.truncated), None)
        if whole is None:  # cut for another mode's prompt: put it back whole
            whole = ContextDoc(target, plan.target_text)
            docs = [whole] + [d for d in docs if d.path != target]
        kwargs["prefill_file"] = whole
        keep = (target,)
    elif mode == "append":
        kwargs.update(prefix=plan.append_prefix, stop=("```", "\n\n\n"),
                      note=f"Write only the new code; it is added at the end of {target}.")
        keep = (target,)
    elif mode == "definition":
        d = plan.definition
        head = d["head"]
        stop = ("```", "\n\n\n")
        if not d["indent"]:
            stop += ("\ndef ", "\nclass ", "\n@", "\nif __name__")
        kwargs.update(prefix=f"{d['path']}\n```python\n{head}", stop=stop,
                      note=f"Write the new version of `{d['name']}` in {d['path']} only: it "
                           "replaces the current definition; everything else stays as it is.")
        keep = (d["path"],)
    if previous is not None:
        kwargs["previous_answer"] = previous.raw or ""
        kwargs["errors"] = _actionable(previous.check.reason or "it failed")
    try:
        fitted = fit_prompt(budget_tokens=plan.budget, count_tokens=backend.count_tokens,
                            context=docs, keep=keep, **kwargs)
    except PromptTooLong as exc:
        raise JobFailed(f"{exc}: the model's context is too small for this repository") from exc
    report = fitted.report()
    report["docs"] = [d.__dict__ for d in fitted.docs]
    return fitted.prompt, report


# ---------------------------------------------------------------- strategies


def first_strategy(settings: Settings, plan: Plan) -> Strategy:
    return Strategy(mode=plan.modes[0], temperature=settings.backend.temperature,
                    shown="requirement and context", why="first attempt")


def retry_strategy(settings: Settings, plan: Plan, history: list[Attempt],
                   attempt: int) -> Strategy:
    """How retry `attempt` differs from the attempts before it: it shows the last failure
    (with hints the model can act on), samples hotter each time and, once a way of asking
    has failed twice or repeated itself, asks another way."""
    modes = plan.modes
    last = history[-1]
    mode = last.mode
    temperature = round(min(1.0, max(settings.backend.temperature, 0.4 * (attempt - 1))), 2)
    why = [f"shows attempt {last.attempt}'s errors and answer",
           f"temperature {temperature}"]
    same = 0
    for h in reversed(history):
        if h.mode != mode:
            break
        same += 1
    if last.check.duplicate_of or same >= 2:
        others = [m for m in modes if m != mode]
        tried = {h.mode for h in history}
        fresh = [m for m in others if m not in tried] or others
        if fresh:
            mode = fresh[0]
            why.append(f"asks another way: {mode}")
    return Strategy(mode=mode, temperature=temperature, shown="errors and previous answer",
                    why="; ".join(why))


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

