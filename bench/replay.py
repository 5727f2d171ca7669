"""Benchmark the whole product on a real repository's history (SWE-bench style).

    python bench/replay.py REPO [--commits 200] [--jobs 5] [--model NAME ...]
        [--backend embedded|openai] [--base-url URL] [--max-new-tokens 256]
        [--context-tokens N] [--attempts 3] [--test-command CMD]

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
"""

from __future__ import annotations

import argparse
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
             sandbox: SandboxSettings) -> Result:
    return replay_task(task, repo, tmp, job_runner(settings, backend), base_cmd, sandbox)


def make_backend(args, model: str, settings: Settings):
    if args.backend == "openai":
        from inference.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings.backend)
    from inference.backends.embedded import EMBEDDED_MODEL_NAME, ensure_converted
    from inference.backends.transformers_backend import TransformersBackend

    path, _ = ensure_converted(settings.embedded.cache_dir)
    adapter = Path(model) if model and Path(model).is_dir() else None
    return TransformersBackend(path, model_name=EMBEDDED_MODEL_NAME, adapter_path=adapter,
                               context_tokens=args.context_tokens)


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
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--context-tokens", type=int, default=None,
                    help="cap the model's context (default: what the model says)")
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--test-command", default="python -m pytest -q -x -p no:cacheprovider")
    ap.add_argument("--timeout", type=float, default=300.0, help="sandbox time limit per run")
    args = ap.parse_args(argv)
    models = args.model or ["smollm2-135m-instruct"]
    sandbox = SandboxSettings(timeout_seconds=args.timeout)

    with tempfile.TemporaryDirectory(prefix="codeloop-replay-") as tmp_name:
        tmp = Path(tmp_name)
        repo = tmp / "source"
        subprocess.run(["git", "clone", "-q", args.repo, str(repo)], check=True)
        t = time.perf_counter()
        tasks, skipped = candidates(repo, args.commits)
        kept = keep_tasks(repo, tmp, tasks, sandbox, args.test_command, args.jobs, skipped)
        select_s = time.perf_counter() - t
        print(f"# replay of {args.repo}: {args.commits} commits looked at, {len(tasks)} change "
              f"source and tests, {len(kept)} kept (fail at parent, pass at commit) "
              f"in {select_s:.0f} s")
        print("skipped: " + (", ".join(f"{k} {v}" for k, v in skipped.most_common()) or "none"))
        for model in models:
            home = tmp / f"home-{len(model)}-{abs(hash(model)) % 1000}"
            served = model if args.backend == "openai" else "smollm2-135m-instruct"
            settings = Settings(
                home=home,
                backend=BackendSettings(kind="openai" if args.backend == "openai" else
                                        "transformers", model=served, base_url=args.base_url,
                                        max_new_tokens=args.max_new_tokens,
                                        context_tokens=args.context_tokens),
                pipeline=PipelineSettings(max_attempts=args.attempts),
                sandbox=sandbox,
            )
            backend = make_backend(args, model, settings)
            results = [run_task(task, repo, tmp, settings, backend, args.test_command, sandbox)
                       for task in kept]
            print_table(model, args.backend, results)
            for r in results:
                print(f"  {r.sha[:10]} {r.state:10} {r.seconds:6.0f} s {r.tokens:6} tok  "
                      f"{r.reason}")
    return 0


def print_table(model: str, backend: str, results: list[Result]) -> None:
    n = len(results) or 1
    resolved = sum(r.state == "resolved" for r in results)
    answers = sum(r.answers for r in results)
    well = sum(r.well_formed for r in results)
    ends = Counter(r.reason if r.state != "resolved" else "resolved" for r in results)
    print(f"\n## {model} ({backend})\n")
    print("| jobs | resolved | well-formed answers | time / job | tokens / job |")
    print("|---|---|---|---|---|")
    print(f"| {len(results)} | {resolved}/{len(results)} ({resolved / n:.0%}) | "
          f"{well}/{answers} ({(well / answers if answers else 0):.0%}) | "
          f"{sum(r.seconds for r in results) / n:.0f} s | "
          f"{sum(r.tokens for r in results) / n:.0f} |")
    print("\n| where jobs ended | jobs |\n|---|---|")
    for reason, count in ends.most_common():
        print(f"| {reason} | {count} |")


if __name__ == "__main__":
    raise SystemExit(main())
