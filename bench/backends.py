"""Benchmark of the backends on one model (the embedded SmolLM2-135M safetensors directory)
and the same prompts: the embedded transformers backend, vLLM one request at a time, vLLM
with concurrent requests, and concurrent `codeloop` pipeline jobs against vLLM. Prints a table.

    .venv/bin/python bench/backends.py [--concurrency 8] [--max-tokens 64] [--runs 3]

vLLM is started by the script (bot.vllm.serve, from the cached vLLM environment, on a free
loopback port) and stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import select

from bot import jobs, vllm
from bot.demo import DEMO_REQUIREMENT, make_sample_repo
from bot.ports import GenerationParams, Message
from bot.runtime import build_runtime, execute
from bot.settings import BackendSettings, QueueSettings
from bot.store.models import JobStage
from tests.support import free_port, make_settings, model_cache_dir

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that returns the square of a number.",
    "Explain what a Python list comprehension is, with an example.",
    "Write a Python function that reverses the words of a sentence.",
]
START_TIMEOUT = 900.0  # seconds; a cold vLLM start on 2 busy cores takes minutes


def row(name: str, value: str, note: str = "") -> None:
    print(f"| {name:<52} | {value:>14} | {note}", flush=True)


def sequential_rate(backend, params: GenerationParams, runs: int) -> tuple[float, int, float]:
    """Median over runs of (sum of completion tokens / sum of seconds) over PROMPTS."""
    rates, tokens, seconds = [], 0, 0.0
    for _ in range(runs):
        tokens, seconds = 0, 0.0
        for text in PROMPTS:
            started = time.perf_counter()
            gen = backend.generate([Message("user", text)], params)
            seconds += time.perf_counter() - started
            tokens += gen.completion_tokens
        rates.append(tokens / seconds)
    return statistics.median(rates), tokens, seconds


def concurrent_rate(
    backend, params: GenerationParams, n: int, runs: int
) -> tuple[float, int, float]:
    """Median over runs of (all completion tokens / wall) for n requests on n threads."""
    rates, tokens, wall = [], 0, 0.0
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    for _ in range(runs):
        barrier = threading.Barrier(n)

        def one(text: str, barrier: threading.Barrier = barrier) -> int:
            barrier.wait()
            return backend.generate([Message("user", text)], params).completion_tokens

        with ThreadPoolExecutor(max_workers=n) as pool:
            started = time.perf_counter()
            counts = list(pool.map(one, prompts))
            wall = time.perf_counter() - started
        tokens = sum(counts)
        rates.append(tokens / wall)
    return statistics.median(rates), tokens, wall


def stage_rows(store, job_ids: list[int]) -> list[tuple[str, float, float]]:
    """(stage name, started, finished) in epoch seconds for the done stages of the jobs."""
    out = []
    with store.session() as s:
        for st in s.scalars(
            select(JobStage).where(JobStage.job_id.in_(job_ids), JobStage.state == "done")
        ):
            if st.finished_at is None:
                continue
            out.append(
                (st.name, st.started_at.timestamp(), st.finished_at.timestamp(), st.seconds or 0.0)
            )
    return out


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted(
        [(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1])
    )
    peak = now = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def _stage_base(name: str) -> str:
    return name.split("-")[0]


def run_jobs(tmp: Path, tag: str, n: int, backend_settings: BackendSettings):
    """n jobs on n threads sharing one runtime; returns (wall, outcomes, stages)."""
    settings = make_settings(
        tmp / f"home-{tag}",
        backend=backend_settings,
        queue=QueueSettings(workers=max(n, 1), lease_seconds=30),
    )
    repos = [make_sample_repo(tmp / f"repo-{tag}-{i}") for i in range(n)]
    runtime = build_runtime(settings)
    try:
        ids = [
            jobs.submit(
                runtime.store,
                source="cli",
                repo=str(repo),
                requirement=DEMO_REQUIREMENT,
                max_bytes=settings.pipeline.max_requirement_bytes,
            ).job_id
            for repo in repos
        ]
        runtime.backend()  # build the (HTTP) backend before the clock starts
        barrier = threading.Barrier(n)

        def one(job_id: int):
            barrier.wait()
            return execute(runtime, job_id, owner=f"bench-{threading.get_ident()}")

        with ThreadPoolExecutor(max_workers=n) as pool:
            started = time.perf_counter()
            outcomes = list(pool.map(one, ids))
            wall = time.perf_counter() - started
        stages = stage_rows(runtime.store, ids)
    finally:
        runtime.close()
    return wall, outcomes, stages


def stage_medians(stages) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for name, _a, _b, secs in stages:
        by.setdefault(_stage_base(name), []).append(secs)
    return {k: statistics.median(v) for k, v in by.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent requests / jobs")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument(
        "--runs", type=int, default=3, help="rounds per generation measure (median)"
    )
    parser.add_argument("--skip-pipeline", action="store_true", help="leave out measure 4")
    args = parser.parse_args()
    n = args.concurrency

    from inference.backends.embedded import EMBEDDED_MODEL_NAME, ensure_converted
    from inference.backends.openai_backend import OpenAIBackend
    from inference.backends.transformers_backend import TransformersBackend

    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} at start; python {sys.version.split()[0]}"
    )
    print(
        f"model: {EMBEDDED_MODEL_NAME} (float32 in both backends); {len(PROMPTS)} prompts, "
        f"greedy, max_tokens={args.max_tokens}, runs={args.runs}, concurrency={n}"
    )
    params = GenerationParams(max_tokens=args.max_tokens, temperature=0.0)
    model_dir, _ = ensure_converted(model_cache_dir())

    print(f"| {'measure':<52} | {'value':>14} | note")
    print(f"|{'-' * 54}|{'-' * 16}|------")

    # 1. embedded transformers backend, sequential
    backend = TransformersBackend(model_dir, model_name=EMBEDDED_MODEL_NAME)
    backend.generate([Message("user", PROMPTS[0])], GenerationParams(max_tokens=8))  # warm-up
    tf_rate, tf_tokens, tf_secs = sequential_rate(backend, params, args.runs)
    row(
        "1. transformers (embedded), sequential",
        f"{tf_rate:.1f} tok/s",
        f"median of {args.runs}; last round {tf_tokens} tokens in {tf_secs:.1f} s",
    )
    del backend

    with tempfile.TemporaryDirectory(prefix="codeloop-bench-backends-") as tmp:
        tmp = Path(tmp)
        settings = make_settings(
            tmp / "home-vllm", backend=BackendSettings(kind="openai", model=EMBEDDED_MODEL_NAME)
        )
        port = free_port()
        base_url = f"http://127.0.0.1:{port}/v1"
        started = time.monotonic()
        proc = vllm.serve(settings, model_dir=model_dir, port=port)
        try:
            vllm.wait_healthy(base_url, START_TIMEOUT, process=proc)
            row(
                "vLLM start to healthy",
                f"{time.monotonic() - started:.1f} s",
                f"port {port}, log {proc.log_path}",
            )
            http = BackendSettings(
                kind="openai", base_url=base_url, model=EMBEDDED_MODEL_NAME, context_tokens=2048
            )
            with OpenAIBackend(http) as client:
                client.generate([Message("user", PROMPTS[0])], GenerationParams(max_tokens=8))
                # 2. one request at a time
                v1_rate, v1_tokens, v1_secs = sequential_rate(client, params, args.runs)
                row(
                    "2. vLLM via OpenAIBackend, 1 request at a time",
                    f"{v1_rate:.1f} tok/s",
                    f"median of {args.runs}; last round {v1_tokens} tokens in {v1_secs:.1f} s; "
                    f"{v1_rate / tf_rate:.2f}x transformers",
                )
                # 3. n concurrent requests
                vn_rate, vn_tokens, vn_wall = concurrent_rate(client, params, n, args.runs)
                row(
                    f"3. vLLM, {n} concurrent requests (aggregate)",
                    f"{vn_rate:.1f} tok/s",
                    f"median of {args.runs}; last round {vn_tokens} tokens in {vn_wall:.1f} s",
                )
                row(f"   speed-up, {n} concurrent vs 1 at a time", f"{vn_rate / v1_rate:.2f}x", "")

            # 4. pipeline jobs: one alone, then n at once on one runtime
            if not args.skip_pipeline:
                job_backend = BackendSettings(
                    kind="openai",
                    base_url=base_url,
                    model=EMBEDDED_MODEL_NAME,
                    supports_prefill=True,
                    context_tokens=2048,
                    max_new_tokens=160,
                )
                w1, o1, s1 = run_jobs(tmp, "one", 1, job_backend)
                row(
                    "4. codeloop job alone, wall",
                    f"{w1:.1f} s",
                    f"state: {o1[0].state}" + (f" ({o1[0].error[:80]})" if o1[0].error else ""),
                )
                wn, on, sn = run_jobs(tmp, "many", n, job_backend)
                states: dict[str, int] = {}
                for o in on:
                    states[o.state] = states.get(o.state, 0) + 1
                row(
                    f"   {n} concurrent jobs (threads, one runtime), wall",
                    f"{wn:.1f} s",
                    "states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
                )
                row(
                    f"   ratio: wall of {n} / wall of 1",
                    f"{wn / w1:.2f}",
                    f"{n:.0f} = no overlap, 1.0 = perfect overlap",
                )
                m1, mn = stage_medians(s1), stage_medians(sn)
                order = ["workspace", "context", "prompt", "generate", "validate", "publish"]
                for stage in sorted(
                    set(m1) | set(mn), key=lambda k: (order.index(k) if k in order else 99, k)
                ):
                    ivs = [(a, b) for name, a, b, _ in sn if _stage_base(name) == stage]
                    alone = f"{m1[stage]:.2f}" if stage in m1 else "-"
                    many = f"{mn[stage]:.2f}" if stage in mn else "-"
                    row(
                        f"   stage {stage}: median alone / in {n}",
                        f"{alone} / {many} s",
                        f"peak {peak_overlap(ivs)} of {n} jobs in this stage at once",
                    )
                errors = [o.error for o in on if o.error]
                for e in errors[:3]:
                    print(f"   failed job: {e[:200]}")
                print(
                    f"note: the validate stage runs each repository's tests (CPU-bound on "
                    f"{os.cpu_count()} cores), and vLLM's CPU engine shares those cores, so the "
                    "overlap ratio on this machine is bounded by CPU, not by the bot."
                )
        finally:
            code = vllm.stop(proc)
            print(f"vLLM stopped (exit {code})")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
