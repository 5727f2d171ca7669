"""Resolved share with best-of-N candidates and requirement tests, off and on.

Each task asks for one function in the sample repository (bot.demo) with a stated example;
its hidden tests are never shown to the pipeline. A task is *resolved* when the job opens a
pull request and the hidden tests pass on its branch (run in the sandbox). A pull request
whose branch fails the hidden tests is a *false accept*: what requirement tests should cut.

    PYTHONPATH=. .venv/bin/python bench/requirements.py                # embedded model
    PYTHONPATH=. .venv/bin/python bench/requirements.py --base-url http://127.0.0.1:8000/v1 \
        --model smollm2-135m-instruct                                  # vLLM (or any server)

Prints one row per configuration: candidates × requirement tests.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

TASKS = [
    ("count_vowels",
     "Add a function count_vowels(text) to textutil.py that returns how many vowels (a, e, i, "
     "o, u) the text contains. For example, count_vowels(\"Hello World\") returns 3.",
     "from textutil import count_vowels\n\n\ndef test_hidden():\n"
     "    assert count_vowels(\"banana\") == 3\n    assert count_vowels(\"xyz\") == 0\n"
     "    assert count_vowels(\"AEIOU\") == 5\n"),
    ("reverse_words",
     "Add a function reverse_words(text) to textutil.py that returns the words of the text in "
     "reverse order. For example, reverse_words(\"a b c\") returns \"c b a\".",
     "from textutil import reverse_words\n\n\ndef test_hidden():\n"
     "    assert reverse_words(\"hello big world\") == \"world big hello\"\n"
     "    assert reverse_words(\"one\") == \"one\"\n"),
    ("is_palindrome",
     "Add a function is_palindrome(text) to textutil.py that returns True when the text reads "
     "the same backwards, ignoring case. For example, is_palindrome(\"Level\") returns True.",
     "from textutil import is_palindrome\n\n\ndef test_hidden():\n"
     "    assert is_palindrome(\"Abba\") is True\n    assert is_palindrome(\"abc\") is False\n"),
    ("initials",
     "Add a function initials(name) to textutil.py that returns the upper-case first letter "
     "of each word. For example, initials(\"ada lovelace\") returns \"AL\".",
     "from textutil import initials\n\n\ndef test_hidden():\n"
     "    assert initials(\"grace brewster hopper\") == \"GBH\"\n"
     "    assert initials(\"x\") == \"X\"\n"),
]

CONFIGS = [(1, "off"), (1, "auto"), (4, "off"), (4, "auto")]


def hidden_passes(repo: Path, branch: str, test: str, sandbox) -> bool:
    from bot.validate import run_tests

    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "c"
        subprocess.run(["git", "clone", "-q", "-b", branch, str(repo), str(clone)], check=True)
        (clone / "tests" / "test_hidden.py").write_text(test)
        result = run_tests(clone, "python -m pytest -q -p no:cacheprovider tests/test_hidden.py",
                           sandbox)
        return result.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible server (default: embedded)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--attempts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--tasks", type=int, default=len(TASKS))
    parser.add_argument("--configs", default=",".join(f"{n}:{m}" for n, m in CONFIGS),
                        help="candidates:requirement_tests pairs, e.g. 1:off,4:auto")
    args = parser.parse_args()

    from bot import jobs
    from bot.demo import make_sample_repo
    from bot.runtime import build_backend, build_runtime, execute
    from bot.settings import BackendSettings, PipelineSettings, Settings

    backend_settings = (
        BackendSettings(kind="openai", base_url=args.base_url, model=args.model,
                        max_new_tokens=args.max_new_tokens)
        if args.base_url else BackendSettings(model=args.model, max_new_tokens=args.max_new_tokens))
    configs = [(int(n), m) for n, m in (c.split(":") for c in args.configs.split(","))]
    root = Path(tempfile.mkdtemp(prefix="codeloop-bench-req-"))
    backend = None
    rows = []
    try:
        for n, mode in configs:
            resolved = opened = false_accepts = 0
            started = time.perf_counter()
            for name, requirement, hidden in TASKS[: args.tasks]:
                work = root / f"{n}-{mode}-{name}"
                repo = make_sample_repo(work / "repo")
                settings = Settings(
                    home=work / "home", backend=backend_settings,
                    pipeline=PipelineSettings(candidates=n, requirement_tests=mode,
                                              max_attempts=args.attempts),
                )
                if backend is None:
                    backend = build_backend(settings)
                runtime = build_runtime(settings, backend=backend)
                sub = jobs.submit(runtime.store, source="cli", repo=str(repo),
                                  requirement=requirement, max_bytes=100_000)
                took = time.perf_counter()
                outcome = execute(runtime, sub.job_id)
                took = time.perf_counter() - took
                hidden_ok = None
                if outcome.state == "succeeded":
                    opened += 1
                    hidden_ok = hidden_passes(repo, outcome.result["branch"], hidden,
                                              settings.sandbox)
                    resolved += hidden_ok
                    false_accepts += not hidden_ok
                why = "" if outcome.state == "succeeded" else " — " + (outcome.error or "")[:80]
                print(f"  candidates={n} requirement_tests={mode} {name}: {outcome.state}"
                      f" hidden tests: {'-' if hidden_ok is None else hidden_ok}"
                      f" ({took:.0f} s){why}", flush=True)
            rows.append((n, mode, resolved, opened, false_accepts,
                         time.perf_counter() - started))
            print(f"  => candidates={n} requirement_tests={mode}: resolved {resolved}, "
                  f"PRs {opened}, false accepts {false_accepts}, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    total = args.tasks
    where = args.base_url or "embedded"
    print(f"\nmodel {args.model} ({where}), {total} tasks, {args.attempts} attempts per job")
    print(f"{'candidates':>10}  {'req. tests':10}  {'resolved':>9}  {'PRs opened':>10}  "
          f"{'false accepts':>13}  {'time':>7}  {'per task':>8}")
    for n, mode, resolved, opened, false_accepts, seconds in rows:
        print(f"{n:>10}  {mode:10}  {resolved}/{total:<7}  {opened:>10}  {false_accepts:>13}  "
              f"{seconds:>6.0f}s  {seconds / total:>7.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
