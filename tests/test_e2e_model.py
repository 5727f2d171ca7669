"""End to end with the real embedded model, through the `codeloop` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select

from bot.store.db import Store
from bot.store.models import Job, JobStage, PullRequest
from tests.support import cli_env, git_out

pytestmark = pytest.mark.model

REQUIREMENT = (
    "Add a function count_vowels(text) to textutil.py that returns how many vowels "
    "(a, e, i, o, u) the text contains."
)


def codeloop(settings, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], env=cli_env(settings),
        capture_output=True, text=True, timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_requirement_to_merged_pull_request_with_signals(sqlite_settings, sample_repo, embedded_model_dir):
    run = codeloop(sqlite_settings, "run", REQUIREMENT, "--repo", str(sample_repo))
    out = run.stdout
    # Progress by stage, then the PR, branch, diff stat and validation result.
    for stage in ("reading", "finding the files", "generating (attempt 1/", "validating",
                  "opening the pull request"):
        assert stage in out, out
    assert "pull request #1" in out and "validation: passed" in out
    assert "textutil.py |" in out

    store = Store(sqlite_settings.database_url)
    with store.session() as s:
        pr = s.scalar(select(PullRequest))
        branch = pr.branch
        gen_stage = s.scalar(select(JobStage).where(JobStage.name.like("generate-%")))
        assert gen_stage.output["completion_tokens"] > 0  # the model really generated
    # The branch's commit passes the sample repository's own tests.
    checkout = sample_repo.parent / "check"
    subprocess.run(["git", "clone", "-q", "--branch", branch, str(sample_repo), str(checkout)],
                   check=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=checkout,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout
    assert "def count_vowels" in (checkout / "textutil.py").read_text()

    codeloop(sqlite_settings, "review", "1", "--approve")
    merged = codeloop(sqlite_settings, "merge", "1")
    assert "merged #1" in merged.stdout
    assert "count_vowels" in git_out(sample_repo, "show", "main:textutil.py")
    shown = codeloop(sqlite_settings, "show", "1").stdout
    assert "state: merged" in shown
    with store.session() as s:
        pr = s.scalar(select(PullRequest))
        assert [sig.kind for sig in pr.signals] == ["approved", "merged"]
        assert all(sig.model_version == "smollm2-135m-instruct" for sig in pr.signals)
        assert all(sig.revision_id == pr.revisions[0].id for sig in pr.signals)
        assert s.scalar(select(Job)).state == "succeeded"


def test_cli_refuses_bad_input_with_clear_messages(sqlite_settings, tmp_path, sample_repo):
    empty = codeloop(sqlite_settings, "run", "   ", "--repo", str(sample_repo), check=False)
    assert empty.returncode == 2 and "requirement is empty" in empty.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    not_repo = codeloop(sqlite_settings, "run", "Add x", "--repo", str(plain), check=False)
    assert not_repo.returncode == 2 and "is not a git repository" in not_repo.stderr
    (sample_repo / "textutil.py").write_text("# uncommitted\n")
    dirty = codeloop(sqlite_settings, "run", "Add x", "--repo", str(sample_repo), check=False)
    assert dirty.returncode == 2 and "uncommitted changes" in dirty.stderr
    missing = codeloop(sqlite_settings, "show", "7", check=False)
    assert missing.returncode == 2 and "no pull request #7" in missing.stderr
