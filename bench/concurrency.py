"""N requirements at once against one backend: does codeloop itself serialise anything?

    .venv/bin/python bench/concurrency.py [--jobs 8] [--latency 10]

The backend is made the bottleneck on purpose: an OpenAI-compatible server on loopback
(tests/openai_server.py, the same peer the tests use) whose every answer takes `--latency`
seconds and is a correct whole-file change. With a perfect bot, N jobs take as long as one
(ratio 1.0); the ratio above 1.0 is the bot's own cost under concurrency (store writes,
git, the validation sandbox sharing the CPU). One run prints: the wall of 1 job, the wall of
N jobs, their ratio, and per-stage medians alone and among N with the peak overlap per stage.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from backends import _stage_base, peak_overlap, row, run_jobs, stage_medians  # noqa: E402

from bot.ports import Generation, GenerationParams, Message  # noqa: E402
from bot.settings import BackendSettings  # noqa: E402
from tests.openai_server import serve_openai  # noqa: E402

# "1b" in the name: codeloop picks the whole-file format and prefill, as for a small model.
MODEL = "fixed-latency-1b"

ANSWER = '''textutil.py
```python
"""Small text helpers."""


def slugify(text):
    """Lower-case words joined by dashes."""
    return "-".join(text.lower().split())


def shout(text):
    """Upper-case text with an exclamation mark."""
    return text.upper() + "!"


def count_vowels(text):
    """How many vowels (a, e, i, o, u) the text contains."""
    return sum(1 for ch in text.lower() if ch in "aeiou")
```
'''


class FixedLatencyBackend:
    """Answers every request with ANSWER after `latency` seconds, streamed in 16 pieces;
    requests run side by side (a GPU server's continuous batching, idealised)."""

    def __init__(self, latency: float):
        self.latency = latency
        self.name = "fixed-latency"
        self.context_tokens = 8192

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 3)

    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[str]:
        text = ANSWER[len(params.prefix):] if ANSWER.startswith(params.prefix) else ANSWER
        step = max(1, len(text) // 16)
        for i in range(0, len(text), step):
            time.sleep(self.latency / 16)
            yield text[i:i + step]

    def generate(self, messages: list[Message], params: GenerationParams,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        started = time.perf_counter()
        pieces = []
        for piece in self.stream(messages, params):
            pieces.append(piece)
            if on_text:
                on_text(piece)
        text = "".join(pieces)
        return Generation(text=params.prefix + text if not text.startswith(params.prefix)
                          else text, model=MODEL, prompt_tokens=self.count_tokens(
                              "".join(m.content for m in messages)),
                          completion_tokens=self.count_tokens(text),
                          seconds=time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8, help="jobs at once")
    parser.add_argument("--latency", type=float, default=10.0, help="seconds per model answer")
    args = parser.parse_args()
    n = args.jobs
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} at start; "
          f"backend: fixed {args.latency:.1f} s per answer; {n} jobs")
    print(f"| {'measure':<52} | {'value':>14} | note")
    print(f"|{'-' * 54}|{'-' * 16}|------")
    backend = FixedLatencyBackend(args.latency)
    with tempfile.TemporaryDirectory(prefix="codeloop-bench-concurrency-") as tmp, \
            serve_openai(backend, served_name=MODEL, context_tokens=8192) as url:
        tmp = Path(tmp)
        settings = BackendSettings(kind="openai", base_url=url, model=MODEL,
                                   context_tokens=8192, max_new_tokens=400)
        w1, o1, s1 = run_jobs(tmp, "one", 1, settings)
        row("1 job alone, wall", f"{w1:.2f} s", f"state: {o1[0].state} {o1[0].error or ''}")
        wn, on, sn = run_jobs(tmp, "many", n, settings)
        states: dict[str, int] = {}
        for o in on:
            states[o.state] = states.get(o.state, 0) + 1
        row(f"{n} jobs at once, wall", f"{wn:.2f} s",
            "states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))
        row(f"overlap ratio: wall of {n} / wall of 1", f"{wn / w1:.2f}",
            f"1.0 = perfect overlap, {n} = serialised; target <= 1.5")
        m1, mn = stage_medians(s1), stage_medians(sn)
        order = ["workspace", "context", "prompt", "generate", "validate", "publish"]
        for stage in sorted(set(m1) | set(mn),
                            key=lambda k: (order.index(k) if k in order else 99, k)):
            ivs = [(a, b) for name, a, b, _ in sn if _stage_base(name) == stage]
            alone = f"{m1[stage]:.2f}" if stage in m1 else "-"
            many = f"{mn[stage]:.2f}" if stage in mn else "-"
            row(f"stage {stage}: median alone / among {n}", f"{alone} / {many} s",
                f"peak {peak_overlap(ivs)} of {n} jobs in this stage at once")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f}")
    return 0 if all(o.state == "succeeded" for o in on) else 1


if __name__ == "__main__":
    sys.exit(main())
