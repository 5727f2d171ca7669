"""Replay: a repository's own history as tasks for the whole pipeline (SWE-bench style).

The reusable core of bench/replay.py and of the evaluation gate's resolved share
(training/evaluate.py). A task is a commit that changes source code and adds or changes test
files; it is kept when the commit's test files fail at the parent and pass at the commit (run
in codeloop's sandbox). A kept task is replayed on a repository whose `main` is the parent
(the commit's tests unseen) with the commit's message (or the change's requirement) as the
requirement; then the commit's test files are put onto codeloop's branch and run: passing is
"resolved".

Running a job needs the composition root, which training may not import
(docs/architecture.md): the caller passes a `RunJob` that submits one job on the target
repository and runs it to its end (bot/replay_jobs.py makes one).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from bot.git import git
from bot.settings import SandboxSettings
from bot.store.db import Store
from bot.store.models import Candidate, JobStage
from bot.validate import run_tests
from inference.paths import is_test_path

log = logging.getLogger(__name__)

SOURCE_EXT = (".py",)


@dataclass
class Task:
    sha: str
    parent: str
    message: str
    tests: list[str]  # the commit's test files (added or changed)
    sources: list[str]


@dataclass
class Result:
    sha: str
    state: str  # resolved | unresolved | failed
    reason: str
    seconds: float
    tokens: int
    answers: int
    well_formed: int
    stage: str = ""
    detail: dict = field(default_factory=dict)
    model_test: str = ""  # the requirement-test stage: "usable", "unusable", "" (none asked)


@dataclass(frozen=True)
class JobRun:
    """How one replayed job ended: its store (for its stages) and its outcome."""

    store: Store
    job_id: int
    state: str
    error: str | None
    result: dict


# (target repository, requirement) -> the job run to its end
RunJob = Callable[[Path, str], JobRun]


def runnable_tests(tests: list[str]) -> list[str]:
    return [t for t in tests if t.endswith(".py") and (
        Path(t).name.startswith("test") or t.endswith("_test.py"))]


def task_for(repo: Path, sha: str, parent: str, message: str) -> tuple[Task | None, str]:
    """The commit as a task, or None and why it is skipped."""
    changed = git(repo, "diff", "--name-status", "--no-renames", parent, sha).splitlines()
    tests, sources = [], []
    for line in changed:
        status, _, path = line.partition("\t")
        if is_test_path(path) and status in ("A", "M"):
            tests.append(path)  # test modules and their data files
        elif path.endswith(SOURCE_EXT) and not is_test_path(path):
            sources.append(path)
    if not sources:
        return None, "no source change"
    if not runnable_tests(tests):
        return None, "no test added or changed"
    return Task(sha, parent, message.strip(), tests, sources), ""


def candidates(repo: Path, n: int) -> tuple[list[Task], Counter]:
    skipped: Counter = Counter()
    out = git(repo, "log", "--no-merges", f"-n{n}", "--format=%x1e%H %P%x1f%B", "HEAD")
    tasks = []
    for record in out.split("\x1e"):
        if not record.strip():
            continue
        head, _, message = record.partition("\x1f")
        shas = head.split()
        if len(shas) != 2:
            skipped["root commit"] += 1
            continue
        sha, parent = shas
        task, why = task_for(repo, sha, parent, message)
        if task is None:
            skipped[why] += 1
        else:
            tasks.append(task)
    return tasks, skipped


def checkout(repo: Path, dest: Path, sha: str) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    git(dest.parent, "clone", "-q", "--shared", "--no-checkout", str(repo), str(dest))
    git(dest, "checkout", "-q", "--detach", sha)
    return dest


def suite_command(base: str, workdir: Path, prepare: str = "") -> str:
    """The project's test command: `base` with a src layout importable, after `prepare`
    (e.g. writing the version file a build backend would generate)."""
    prefix = "PYTHONPATH=src " if (workdir / "src").is_dir() else ""
    return (f"{prepare} && " if prepare else "") + f"{prefix}{base}"


def test_command(base: str, tests: list[str], workdir: Path, prepare: str = "") -> str:
    return f"{suite_command(base, workdir, prepare)} " + " ".join(runnable_tests(tests))


def run_commit_tests(repo: Path, tmp: Path, at: str, task: Task, sandbox: SandboxSettings,
                     base_cmd: str, prepare: str = "") -> tuple[bool, str]:
    work = checkout(repo, tmp / "check", at)
    git(work, "checkout", "-q", task.sha, "--", *task.tests)
    result = run_tests(work, test_command(base_cmd, task.tests, work, prepare), sandbox)
    return result.ok, result.output


def keep_tasks(repo: Path, tmp: Path, tasks: list[Task], sandbox: SandboxSettings,
               base_cmd: str, want: int, skipped: Counter, prepare: str = "") -> list[Task]:
    kept = []
    for task in tasks:
        if len(kept) >= want:
            skipped["not needed (enough kept)"] += 1
            continue
        at_parent, _ = run_commit_tests(repo, tmp, task.parent, task, sandbox, base_cmd, prepare)
        if at_parent:
            skipped["tests pass at the parent"] += 1
            continue
        at_commit, _ = run_commit_tests(repo, tmp, task.sha, task, sandbox, base_cmd, prepare)
        if not at_commit:
            skipped["tests fail at the commit"] += 1
            continue
        # The pipeline validates with the project's whole suite: if it fails at the parent,
        # no change could pass, and the job would measure the project, not the model.
        work = checkout(repo, tmp / "check", task.parent)
        if not run_tests(work, suite_command(base_cmd, work, prepare), sandbox).ok:
            skipped["the suite fails at the parent"] += 1
            continue
        kept.append(task)
    return kept


def target_repo(repo: Path, tmp: Path, task: Task, base_cmd: str, prepare: str = "") -> Path:
    """A repository whose main is the parent commit, plus a .codeloop.yml commit when the
    project has none (its existing tests, never the commit's)."""
    dest = tmp / "target"
    if dest.exists():
        shutil.rmtree(dest)
    git(tmp, "clone", "-q", "--no-checkout", str(repo), str(dest))
    git(dest, "checkout", "-q", "-B", "main", task.parent)
    if not (dest / ".codeloop.yml").exists():
        command = suite_command(base_cmd, dest, prepare)
        (dest / ".codeloop.yml").write_text(f"test_command: {json.dumps(command)}\n")
        git(dest, "add", ".codeloop.yml")
        git(dest, "commit", "-qm", "codeloop config for the replay")
    return dest


def classify(reason: str) -> str:
    r = reason.lower()
    for needle, label in (
        ("no parsable edit", "no parsable edit"), ("search text", "search/replace did not fit"),
        ("repeats attempt", "repeated answer"), ("syntax", "syntax error"),
        ("## ruff", "ruff"), ("## tests", "tests failed"), ("truncat", "truncation marker"),
        ("refused", "refused edit"), ("context", "prompt length"),
        ("changed nothing", "changed nothing"), ("backend", "backend"),
    ):
        if needle in r:
            return label
    return reason.strip().splitlines()[0][:40] if reason.strip() else "unknown"


def run_task(task: Task, repo: Path, tmp: Path, run_job: RunJob, base_cmd: str,
             sandbox: SandboxSettings, prepare: str = "") -> Result:
    target = target_repo(repo, tmp, task, base_cmd, prepare)
    started = time.perf_counter()
    try:
        job = run_job(target, task.message)
    except Exception as exc:  # a crash of codeloop, not a model failure: say it loudly
        log.error("replay of %s crashed:\n%s", task.sha[:10], traceback.format_exc())
        return Result(task.sha, "failed", f"crash: {type(exc).__name__}",
                      time.perf_counter() - started, 0, 0, 0, "crash")
    seconds = time.perf_counter() - started
    tokens = answers = well = 0
    last_stage, last_reason, model_test = "", "", ""
    with job.store.session() as s:
        rows = list(s.scalars(select(JobStage).where(JobStage.job_id == job.job_id)
                              .order_by(JobStage.id)))
        for row in rows:
            out = row.output or {}
            if row.state == "done" and (row.name.startswith("generate-")
                                        or row.name == "requirement-test"):
                tokens += int(out.get("prompt_tokens", 0)) + int(out.get("completion_tokens", 0))
            if row.name.startswith("validate-") and row.state == "done":
                last_reason = out.get("reason", "")
            if row.name == "requirement-test" and row.state == "done":
                model_test = "usable" if out.get("test") else "unusable"
            last_stage = row.name.split("-")[0]
            if row.state == "failed":
                last_reason = row.error or last_reason
        # Every answer counts, each of N candidates included: well-formed when it parsed
        # into an edit (whether or not that edit then applied and passed).
        for cand in s.scalars(select(Candidate).where(Candidate.job_id == job.job_id)):
            answers += 1
            well += "no parsable edit" not in (cand.reason or "")
    if job.state != "succeeded":
        reason = job.error or last_reason
        return Result(task.sha, "failed", f"{last_stage}: {classify(reason)}", seconds, tokens,
                      answers, well, last_stage, model_test=model_test)
    branch = job.result["branch"]
    check = checkout(target, tmp / "resolved", f"origin/{branch}")
    git(check, "checkout", "-q", task.sha, "--", *task.tests)
    result = run_tests(check, test_command(base_cmd, task.tests, check, prepare), sandbox)
    state = "resolved" if result.ok else "unresolved"
    return Result(task.sha, state, "" if result.ok else "commit's tests fail on the branch",
                  seconds, tokens, answers, well, "publish", model_test=model_test)
