"""The pipeline against real git repositories, a real store and the real sandbox; the model
answer comes from a scripted backend (a fake at the Backend port) so each case is exact."""

from __future__ import annotations

import subprocess

import pytest
from sqlalchemy import func, select

from bot import jobs
from bot.runtime import build_runtime, execute
from bot.store.models import EditFormatStat, Job, JobStage, PullRequest, Revision
from tests.support import git_out
from tests.fakes import GOOD, ScriptedBackend


def branches(repo) -> list[str]:
    return [b.strip() for b in git_out(repo, "branch", "--format=%(refname:short)").splitlines()]


def submit(runtime, repo, text="Add a whisper(text) helper"):
    return jobs.submit(runtime.store, source="cli", repo=str(repo), requirement=text, max_bytes=100_000)


def test_requirement_becomes_validated_pull_request(settings, sample_repo):
    runtime = build_runtime(settings, backend=ScriptedBackend(GOOD))
    sub = submit(runtime, sample_repo)
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "succeeded", outcome.error
    branch = outcome.result["branch"]
    assert branch.startswith("codeloop/1-add-a-whisper")
    assert branch in branches(sample_repo)
    # The branch holds one commit on top of main whose tests pass.
    assert git_out(sample_repo, "rev-list", "--count", f"main..{branch}").strip() == "1"
    assert "def whisper" in git_out(sample_repo, "show", f"{branch}:textutil.py")
    with runtime.store.session() as s:
        pr = s.scalar(select(PullRequest))
        assert pr.state == "open" and pr.number == pr.id
        # The verdict says what checked the change: here nothing ran the new function.
        assert "no test exercises the new code" in pr.body
        assert "existing tests: 2 passed" in pr.body and "Add a whisper(text) helper" in pr.body
        assert [r.number for r in pr.revisions] == [1]
        stages = [st.name for st in s.scalars(select(JobStage).order_by(JobStage.id))]
        # No example in the requirement, and the embedded default asks the model for no test.
        assert stages[:4] == ["workspace", "context", "prompt", "generate-1"]
        assert stages[-1] == "publish"
        stat = s.get(EditFormatStat, ("scripted", "whole"))
        assert (stat.well_formed, stat.malformed) == (1, 0)
    # The user's checkout is untouched.
    assert git_out(sample_repo, "status", "--porcelain") == ""


def test_same_request_twice_is_one_job_and_one_pull_request(settings, sample_repo):
    runtime = build_runtime(settings, backend=ScriptedBackend(GOOD))
    first = submit(runtime, sample_repo)
    second = submit(runtime, sample_repo)
    assert second.job_id == first.job_id and not second.created
    assert execute(runtime, first.job_id).state == "succeeded"
    assert execute(runtime, second.job_id).state == "skipped"
    with runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(PullRequest)) == 1
    assert len([b for b in branches(sample_repo) if b.startswith("codeloop/")]) == 1


def test_answer_without_edit_fails_with_reason_and_leaves_no_branch(sqlite_settings, sample_repo):
    backend = ScriptedBackend("I think you should add a function. Good luck!")
    runtime = build_runtime(sqlite_settings, backend=backend)
    outcome = execute(runtime, submit(runtime, sample_repo).job_id)
    assert outcome.state == "failed"
    assert "no parsable edit" in outcome.error
    assert len(backend.calls) == sqlite_settings.pipeline.max_attempts  # retried, then gave up
    assert [b for b in branches(sample_repo) if b.startswith("codeloop/")] == []
    with runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(PullRequest)) == 0
        job = s.scalar(select(Job))
        assert job.state == "failed" and "no parsable edit" in job.error


def test_edit_into_protected_path_is_refused(sqlite_settings, sample_repo):
    answer = ".github/workflows/ci.yml\n```yaml\non: push\njobs: {}\n```\n"
    backend = ScriptedBackend(answer)
    runtime = build_runtime(sqlite_settings, backend=backend)
    outcome = execute(runtime, submit(runtime, sample_repo, "Edit the CI workflow").job_id)
    assert outcome.state == "failed"
    assert ".github/workflows/ci.yml" in outcome.error and "protected" in outcome.error
    assert len(backend.calls) == 1  # a refusal is not retried
    assert [b for b in branches(sample_repo) if b.startswith("codeloop/")] == []


def test_failing_tests_are_sent_back_to_the_model(sqlite_settings, sample_repo):
    broken = GOOD.replace('return text.upper() + "!"', 'return text.upper()')
    backend = ScriptedBackend(broken, GOOD)
    runtime = build_runtime(sqlite_settings, backend=backend)
    outcome = execute(runtime, submit(runtime, sample_repo).job_id)
    assert outcome.state == "succeeded"
    assert outcome.result["attempt"] == 2
    retry_prompt = backend.calls[1][-1].content
    assert "did not pass validation" in retry_prompt and "test_shout" in retry_prompt


def test_hanging_test_command_is_killed_at_the_timeout(tmp_path, sample_repo):
    from bot.settings import PipelineSettings, SandboxSettings
    from tests.support import make_settings

    (sample_repo / ".codeloop.yml").write_text("test_command: sleep 600\n")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "slow"],
                   cwd=sample_repo, check=True)
    settings = make_settings(tmp_path / "home", sandbox=SandboxSettings(timeout_seconds=2),
                             pipeline=PipelineSettings(max_attempts=1))
    runtime = build_runtime(settings, backend=ScriptedBackend(GOOD))
    outcome = execute(runtime, submit(runtime, sample_repo).job_id)
    assert outcome.state == "failed"
    assert "timed out after 2" in outcome.error
    assert [b for b in branches(sample_repo) if b.startswith("codeloop/")] == []


def test_request_changes_revises_the_same_pull_request(settings, sample_repo):
    from feedback.signals import record_local_review

    revised = GOOD.replace('return text.lower() + "..."', 'return text.lower() + "…"')
    runtime = build_runtime(settings, backend=ScriptedBackend(GOOD, revised))
    first = execute(runtime, submit(runtime, sample_repo).job_id)
    review = record_local_review(runtime.store, first.result["pull_request_id"],
                                 kind="changes_requested", body="Use a real ellipsis", author="rev")
    # Recording the review starts nothing; the edge submits the revision it asks for.
    wanted = review.revision
    job_id, _ = jobs.submit_revision(runtime.store, request_id=wanted.request_id,
                                     pull_request_id=wanted.pull_request_id,
                                     feedback=wanted.feedback, key=wanted.key)
    second = execute(runtime, job_id)
    assert second.state == "succeeded", second.error
    assert second.result["branch"] == first.result["branch"]
    assert second.result["revision"] == 2
    branch = first.result["branch"]
    assert git_out(sample_repo, "rev-list", "--count", f"main..{branch}").strip() == "2"
    with runtime.store.session() as s:
        pr = s.scalar(select(PullRequest))
        assert [r.trigger for r in pr.revisions] == ["initial", "review"]
        assert [sig.kind for sig in pr.signals] == ["changes_requested"]
        assert pr.signals[0].revision_id == pr.revisions[0].id
        assert s.scalar(select(func.count()).select_from(Revision)) == 2


def test_dirty_working_tree_is_refused(sqlite_settings, sample_repo):
    (sample_repo / "textutil.py").write_text("# local edit\n")
    runtime = build_runtime(sqlite_settings, backend=ScriptedBackend(GOOD))
    outcome = execute(runtime, submit(runtime, sample_repo).job_id)
    assert outcome.state == "failed" and "uncommitted changes" in outcome.error


@pytest.mark.parametrize("text", ["", "   \n\t  "])
def test_empty_requirement_is_refused(sqlite_settings, sample_repo, text):
    runtime = build_runtime(sqlite_settings, backend=ScriptedBackend(GOOD))
    with pytest.raises(jobs.BadRequest, match="empty"):
        submit(runtime, sample_repo, text)
    with runtime.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_oversized_requirement_is_truncated_with_a_note(sqlite_settings, sample_repo):
    runtime = build_runtime(sqlite_settings, backend=ScriptedBackend(GOOD))
    sub = submit(runtime, sample_repo, "Add whisper. " + "x" * 200_000)
    from bot.store.models import Request

    with runtime.store.session() as s:
        req = s.get(Request, sub.request_id)
        assert req.truncated
        assert len(req.requirement.encode()) < 100_200
        assert "requirement truncated by codeloop" in req.requirement


def test_backend_unreachable_fails_clearly(tmp_path, sample_repo):
    import socket

    from bot.settings import BackendSettings, QueueSettings
    from tests.support import make_settings

    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(
        tmp_path / "home",
        backend=BackendSettings(kind="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1),
        queue=QueueSettings(max_runs=1),
    )
    runtime = build_runtime(settings)
    outcome = execute(runtime, submit(runtime, sample_repo).job_id)
    assert outcome.state == "failed"
    assert "stayed unavailable after 1 tries" in outcome.error
    assert f"127.0.0.1:{port}" in outcome.error
    assert [b for b in branches(sample_repo) if b.startswith("codeloop/")] == []


def test_every_checkpoint_reads_back_as_it_was_stored(sqlite_settings, sample_repo):
    """A resumed job reads each stage's stored JSON into the stage's typed result: nothing
    of what was stored is lost on the way (two attempts: every kind of stage)."""
    from bot.pipeline.results import (
        Check,
        Checkout,
        ContextFound,
        Generation,
        PlannedPrompt,
        RetryPrompt,
    )

    broken = GOOD.replace('return text.upper() + "!"', 'return text.upper()')
    runtime = build_runtime(sqlite_settings, backend=ScriptedBackend(broken, GOOD))
    assert execute(runtime, submit(runtime, sample_repo).job_id).state == "succeeded"
    kinds = {"workspace": Checkout, "context": ContextFound, "prompt": PlannedPrompt,
             "generate": Generation, "validate": Check}
    seen = []
    with runtime.store.session() as s:
        for st in s.scalars(select(JobStage).order_by(JobStage.id)):
            base = st.name.partition("-")[0]
            kind = RetryPrompt if st.name.startswith("prompt-") else kinds.get(base)
            if kind is not None:
                assert kind.from_json(st.output).to_json() == st.output, st.name
                seen.append(st.name)
    assert seen == ["workspace", "context", "prompt", "generate-1", "validate-1", "prompt-2",
                    "generate-2", "validate-2"]


def test_a_checkpoint_without_the_configuration_resumes_with_the_trusted_one(
    sqlite_settings, sample_repo
):
    """Older versions stored the workspace stage without `.codeloop.yml`: the resumed job
    does not check out again, and reads the configuration from the default branch."""
    (sample_repo / ".codeloop.yml").write_text("protected_paths: [textutil.py]\n")
    subprocess.run(["git", "add", ".codeloop.yml"], cwd=sample_repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm",
                    "protect"], cwd=sample_repo, check=True)
    head = git_out(sample_repo, "rev-parse", "HEAD").strip()
    runtime = build_runtime(sqlite_settings, backend=ScriptedBackend(GOOD))
    sub = submit(runtime, sample_repo)
    with runtime.store.session() as s:
        s.add(JobStage(job_id=sub.job_id, name="workspace", state="done",
                       output={"base_branch": "main", "start_sha": head}))
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "failed"
    assert "textutil.py is a protected path" in outcome.error
    with runtime.store.session() as s:
        names = [st.name for st in s.scalars(select(JobStage).where(JobStage.job_id == sub.job_id))]
    assert names.count("workspace") == 1
