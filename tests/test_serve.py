"""`codeloop serve` (web + worker + scheduler in one process) as a real subprocess: it serves
the web app, runs a queued job, and on SIGTERM stops without losing the job it was running:
a worker started later resumes it from its last finished stage and the model is not asked
again. The model answers through an OpenAI-compatible server on loopback (scripted text)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from sqlalchemy import select

from bot.store.db import Store
from bot.store.models import Job, JobStage
from tests.support import cli_env, git_out, make_settings, wait_for
from tests.fakes import ScriptedBackend
from tests.openai_server import Faults, serve_openai
from tests.test_pipeline import GOOD

SLOW_TESTS = '''import time

from textutil import shout


def test_shout():
    time.sleep(4)  # long enough to stop the process while it validates
    assert shout("hi") == "HI!"
'''


class StreamingScripted(ScriptedBackend):
    """The scripted answer, also streamed to `on_text` as a real backend does."""

    def generate(self, messages, params, on_text=None):
        gen = super().generate(messages, params)
        if on_text is not None:
            on_text(gen.text)
        return gen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit_all(repo, message):
    for args in (["add", "-A"], ["commit", "-qm", message]):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                       check=True)


def test_sigterm_leaves_the_running_job_to_the_queue(tmp_path, sample_repo):
    (sample_repo / "tests" / "test_slow.py").write_text(SLOW_TESTS)
    commit_all(sample_repo, "slow test")
    settings = make_settings(tmp_path / "home")
    port = free_port()
    faults = Faults()
    backend = StreamingScripted(GOOD)
    with serve_openai(backend, served_name="smollm2-135m-instruct", faults=faults) as base_url:
        env = cli_env(settings)
        env.update(CODELOOP_BACKEND__KIND="openai", CODELOOP_BACKEND__BASE_URL=base_url,
                   CODELOOP_WEB__PORT=str(port),
                   CODELOOP_OPS__LOG_FORMAT="json", CODELOOP_PIPELINE__PREFILL="off",
                   # One answer, validated in the job's own thread: what SIGTERM meets.
                   CODELOOP_PIPELINE__CANDIDATES="1", CODELOOP_PIPELINE__REQUIREMENT_TESTS="off")
        queued = subprocess.run(
            [sys.executable, "-m", "bot.cli", "run", "--queue", "Add a whisper(text) helper",
             "--repo", str(sample_repo)], env=env, capture_output=True, text=True, timeout=120)
        assert queued.returncode == 0, queued.stderr
        store = Store(settings.database_url)

        def stage_state(name):
            with store.session() as s:
                return s.scalars(select(JobStage.state).where(JobStage.name == name)).all()

        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log:
            serve = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                def web_up():
                    try:
                        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).json()
                    except httpx.HTTPError:
                        return None

                assert wait_for(web_up, 60, "the web server") == {"ready": True, "detail": "ok"}
                metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                assert "codeloop_jobs" in metrics
                wait_for(lambda: "running" in stage_state("validate-1"), 120,
                         "validation to start")
                started = time.monotonic()
                serve.send_signal(signal.SIGTERM)
                code = serve.wait(timeout=30)
                stopped_in = time.monotonic() - started
            finally:
                if serve.poll() is None:
                    os.killpg(serve.pid, signal.SIGKILL)
        output = log_path.read_text()
        assert code == 0, output
        assert stopped_in < 20, output
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        messages = [line["message"] for line in lines]
        assert "shutting down (SIGTERM)" in messages, output
        assert any("resume from their last finished stage" in m for m in messages), output
        with store.session() as s:
            job = s.scalar(select(Job))
            assert job.state == "running" and job.error is None  # not failed, not lost
        assert stage_state("generate-1") == ["done"]
        assert faults.chat_requests == 1

        # Any worker's recovery sweep picks it up (the owner process is gone) and finishes it.
        with open(log_path, "a") as log:
            worker = subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                def finished():
                    with store.session() as s:
                        state = s.scalar(select(Job.state))
                        return state if state in ("succeeded", "failed") else None

                assert wait_for(finished, 180, "the resumed job") == "succeeded", \
                    log_path.read_text()
            finally:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)
        assert faults.chat_requests == 1  # the model was not asked again
    assert stage_state("validate-1") == ["interrupted", "done"]
    branches = [b for b in git_out(sample_repo, "branch").split() if b.startswith("codeloop/")]
    assert len(branches) == 1


def test_web_exits_with_an_error_when_its_port_is_taken(tmp_path):
    settings = make_settings(tmp_path / "home")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = cli_env(settings)
        env.update(CODELOOP_WEB__PORT=str(taken.getsockname()[1]), CODELOOP_OPS__LOG_FORMAT="text")
        done = subprocess.run([sys.executable, "-m", "bot.cli", "web"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "address already in use" in done.stderr.lower()
    assert "web stopped; shutting the process down" in done.stderr
