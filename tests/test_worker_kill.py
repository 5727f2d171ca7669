"""A worker killed with SIGKILL mid-job: after a restart the job finishes once, and the
finished generation is not generated again. Real worker processes (huey consumer), the
real model, SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from bot.store.db import Store
from bot.store.models import Job, JobStage, PullRequest
from tests.conftest import cli_env, git_out, make_settings

pytestmark = pytest.mark.model

SLOW_TESTS = '''import time

from textutil import shout


def test_shout():
    time.sleep(4)  # long enough to kill the worker while it validates
    assert shout("hi") == "HI!"
'''


def start_worker(settings, log):
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "worker"], env=cli_env(settings),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_worker_resumes_without_generating_twice(tmp_path, db_url, sample_repo, embedded_model_dir):
    (sample_repo / "tests" / "test_slow.py").write_text(SLOW_TESTS)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], cwd=sample_repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "slow"],
                   cwd=sample_repo, check=True)
    settings = make_settings(tmp_path / "home", db_url)
    env = cli_env(settings)
    queued = subprocess.run(
        [sys.executable, "-m", "bot.cli", "run", "--queue", "Add a function count_vowels(text) "
         "to textutil.py that returns how many vowels the text contains.", "--repo", str(sample_repo)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert queued.returncode == 0, queued.stderr
    store = Store(settings.database_url)

    def stage(name_like, state):
        with store.session() as s:
            return s.scalar(select(func.count()).select_from(JobStage).where(
                JobStage.name.like(name_like), JobStage.state == state))

    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = start_worker(settings, log)
        try:
            wait_for(lambda: stage("validate-%", "running"), 300, "validation to start")
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
        assert stage("generate-%", "done") == 1
        with store.session() as s:
            assert s.scalar(select(Job.state)) == "running"  # orphaned by the kill
        assert [b for b in git_out(sample_repo, "branch").split() if b.startswith("codeloop/")] == []

        worker = start_worker(settings, log)
        try:
            def finished():
                with store.session() as s:
                    state = s.scalar(select(Job.state))
                    return state if state in ("succeeded", "failed") else None

            assert wait_for(finished, 300, "the resumed job") == "succeeded", log_path.read_text()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)

    with store.session() as s:
        job = s.scalar(select(Job))
        assert job.runs == 2  # claimed by the killed worker, then by the restarted one
        gens = s.scalars(select(JobStage).where(JobStage.name.like("generate-%"))).all()
        assert [(g.name, g.state) for g in gens] == [("generate-1", "done")]  # never twice
        assert s.scalar(select(func.count()).select_from(PullRequest)) == 1
        validations = s.scalars(select(JobStage.state).where(JobStage.name == "validate-1")).all()
        assert validations == ["interrupted", "done"]
    branches = [b for b in git_out(sample_repo, "branch").split() if b.startswith("codeloop/")]
    assert len(branches) == 1
    assert git_out(sample_repo, "rev-list", "--count", f"main..{branches[0]}").strip() == "1"
