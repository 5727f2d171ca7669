"""End to end with the real embedded model: a labelled issue on the local GitHub server becomes
a pull request whose branch passes the repository's tests."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select

from bot.demo import DEMO_REQUIREMENT
from bot.store.models import Job, JobStage
from tests.github_harness import REPO, make_env
from tests.github_server import BOT_LOGIN

pytestmark = pytest.mark.model


def test_labelled_issue_becomes_a_passing_pull_request(tmp_path, embedded_backend):
    env = make_env(tmp_path, embedded_backend)
    try:
        issue = env.fake.open_issue(env.repo, "count_vowels(text)", DEMO_REQUIREMENT, "alice")
        payload = env.fake.issue_labeled(env.repo, issue, "codeloop", "alice")
        assert env.deliver("issues", payload).status_code == 202
        env.work()  # handle_delivery, then run_job: the task functions a worker runs

        with env.runtime.store.session() as s:
            job = s.scalar(select(Job))
            assert job.state == "succeeded", job.error
            generated = s.scalar(select(JobStage).where(JobStage.name.like("generate-%")))
            assert generated.output["completion_tokens"] > 0  # the model really generated
        assert len(env.repo.pulls) == 1
        number, pull = next(iter(env.repo.pulls.items()))
        assert f"Closes #{issue}" in env.repo.issues[number]["body"]

        checkout = tmp_path / "check"
        subprocess.run(
            ["git", "clone", "-q", "--branch", pull["head"], str(env.repo.path), str(checkout)],
            check=True,
        )
        assert "def count_vowels" in (checkout / "textutil.py").read_text()
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=checkout,
            capture_output=True,
            text=True,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr

        status = [c for c in env.fake.comments_on(env.repo, issue) if c["user"] == BOT_LOGIN]
        assert len(status) == 1
        assert status[0]["body"].rstrip().endswith(f"{env.fake.url}/{REPO}/pull/{number}")
    finally:
        env.close()
