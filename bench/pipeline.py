"""Benchmark of the embedded path: model load (cold GGUF, warm cache), one `codeloop run`
stage by stage, and generation speed. Prints a table.

    .venv/bin/python bench/pipeline.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select  # noqa: E402

from bot.demo import DEMO_REQUIREMENT, make_sample_repo  # noqa: E402
from bot.ports import GenerationParams, Message  # noqa: E402
from bot.store.db import Store  # noqa: E402
from bot.store.models import Job, JobStage  # noqa: E402


def row(name: str, value: str, note: str = "") -> None:
    print(f"| {name:<44} | {value:>12} | {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="codeloop runs to time")
    args = parser.parse_args()

    from inference.backends.embedded import EMBEDDED_MODEL_NAME, ensure_converted
    from inference.backends.transformers_backend import TransformersBackend

    print(f"machine: {os.cpu_count()} CPUs, torch threads default; python {sys.version.split()[0]}")
    print(f"| {'measure':<44} | {'value':>12} | note")
    print(f"|{'-' * 46}|{'-' * 14}|------")
    with tempfile.TemporaryDirectory(prefix="codeloop-bench-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        model_dir, _ = ensure_converted(tmp / "models")
        row("model load, cold (GGUF → safetensors cache)", f"{time.perf_counter() - started:.1f} s",
            "once per machine")
        started = time.perf_counter()
        backend = TransformersBackend(model_dir, model_name=EMBEDDED_MODEL_NAME)
        row("model load, warm (safetensors cache)", f"{time.perf_counter() - started:.2f} s",
            "every worker start")

        prompt = [Message("user", "Write a Python function that checks whether a number is prime.")]
        backend.generate(prompt, GenerationParams(max_tokens=8))  # warm-up
        rates = []
        for _ in range(3):
            gen = backend.generate(prompt, GenerationParams(max_tokens=128))
            rates.append(gen.completion_tokens / gen.seconds)
        row("generation speed (128 tokens, greedy)", f"{statistics.median(rates):.1f} tok/s",
            f"median of 3; prompt {gen.prompt_tokens} tokens")

        stage_seconds: dict[str, list[float]] = {}
        walls, gen_rates, states = [], [], []
        for i in range(args.runs):
            home = tmp / f"home-{i}"
            repo = make_sample_repo(tmp / f"repo-{i}")
            env = {**os.environ, "CODELOOP_HOME": str(home),
                   "CODELOOP_EMBEDDED__CACHE_DIR": str(tmp / "models")}
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "bot.cli", "run", DEMO_REQUIREMENT, "--repo", str(repo)],
                env=env, capture_output=True, text=True,
            )
            walls.append(time.perf_counter() - started)
            store = Store(f"sqlite:///{home / 'codeloop.db'}")
            with store.session() as s:
                states.append(s.scalar(select(Job.state)))
                for stage in s.scalars(select(JobStage).where(JobStage.state == "done")):
                    stage_seconds.setdefault(stage.name, []).append(stage.seconds or 0.0)
                    if stage.name.startswith("generate-") and stage.output.get("seconds"):
                        out = stage.output
                        gen_rates.append(out["completion_tokens"] / out["seconds"])
            store.close()
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
        for name in sorted(stage_seconds, key=_stage_order):
            values = stage_seconds[name]
            row(f"stage {name}", f"{statistics.median(values):.2f} s", f"median of {len(values)}")
        row("codeloop run, wall (process start to PR)", f"{statistics.median(walls):.1f} s",
            f"median of {len(walls)}; states: {', '.join(states)}")
        if gen_rates:
            row("generation speed inside the pipeline", f"{statistics.median(gen_rates):.1f} tok/s",
                "prefilled whole-file answer")
    return 0


def _stage_order(name: str) -> tuple[int, str]:
    order = ["workspace", "context", "prompt", "generate", "validate", "publish"]
    base = name.split("-")[0]
    return (order.index(base) if base in order else 99, name)


if __name__ == "__main__":
    sys.exit(main())
