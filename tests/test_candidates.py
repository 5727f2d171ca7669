"""Best of N: several candidates per prompt, validated in parallel sandboxes; the best is kept
and every candidate is stored (an execution-verified preference pair for the learning loop).
Real git, sandbox and store; the answers are scripted at the Backend port, or served by the
loopback OpenAI-compatible server (one request with `n`)."""

from __future__ import annotations

from sqlalchemy import select

from bot import jobs
from bot.runtime import build_runtime, execute
from bot.settings import BackendSettings, PipelineSettings
from bot.store.models import Candidate
from tests.support import git_out, make_settings
from tests.fakes import ScriptedBackend
from tests.openai_server import Faults, serve_openai
from tests.test_reqtests import ASKED, HEAD, VOWELS, WORDS

SYNTAX_ERROR = HEAD + "def count_vowels(text)\n    return 0\n```\n"
BREAKS_SHOUT = VOWELS.replace('return text.upper() + "!"', "return text.upper()")
# Passes too, but with a bigger diff than VOWELS: the tie goes to the smaller change.
VERBOSE = HEAD + ('def count_vowels(text):\n    total = 0\n    for c in text.lower():\n'
                  '        if c in "aeiou":\n            total += 1\n    return total\n```\n')


def submit(runtime, repo):
    return jobs.submit(runtime.store, source="cli", repo=str(repo), requirement=ASKED,
                       max_bytes=100_000).job_id


def test_four_candidates_the_passing_one_is_chosen_and_the_rest_stored(
        tmp_path, db_url, sample_repo):
    settings = make_settings(tmp_path / "home", db_url, pipeline=PipelineSettings(
        candidates=4, candidate_concurrency=2, max_attempts=1))
    backend = ScriptedBackend(WORDS, SYNTAX_ERROR, VOWELS, BREAKS_SHOUT)
    runtime = build_runtime(settings, backend=backend)
    outcome = execute(runtime, submit(runtime, sample_repo))
    assert outcome.state == "succeeded", outcome.error
    assert len(backend.calls) == 4
    shipped = git_out(sample_repo, "show", f"{outcome.result['branch']}:textutil.py")
    assert 'if c in "aeiou"' in shipped and "split()" not in shipped.split("count_vowels")[1]
    with runtime.store.session() as s:
        rows = s.scalars(select(Candidate).order_by(Candidate.idx)).all()
        assert [(r.idx, r.ok, r.chosen) for r in rows] == [
            (0, False, False), (1, False, False), (2, True, True), (3, False, False)]
        assert "assert 2 == 3" in rows[0].reason  # the requirement test caught it
        assert "SyntaxError" in rows[1].reason or "syntax" in rows[1].reason.lower()
        assert "test_shout" in rows[3].reason  # an existing test caught it
        # Same prompt for all: a passing and a failing answer form a preference pair.
        assert len({str(r.prompt) for r in rows}) == 1
        # Ranked by what passed: requirement tests, existing tests, lint.
        scores = {r.idx: r.score for r in rows}
        assert scores[2] > scores[3] > scores[0] > scores[1]


def test_equal_candidates_the_smaller_diff_wins(tmp_path, sample_repo):
    settings = make_settings(tmp_path / "home", pipeline=PipelineSettings(
        candidates=2, max_attempts=1))
    runtime = build_runtime(settings, backend=ScriptedBackend(VERBOSE, VOWELS))
    outcome = execute(runtime, submit(runtime, sample_repo))
    assert outcome.state == "succeeded", outcome.error
    with runtime.store.session() as s:
        rows = s.scalars(select(Candidate).order_by(Candidate.idx)).all()
        assert [(r.ok, r.chosen) for r in rows] == [(True, False), (True, True)]


def test_openai_backend_asks_for_n_candidates_in_one_request(tmp_path, sample_repo):
    faults = Faults()
    # The embedded model's name: its edit format (whole files) is what the script answers in.
    name = "smollm2-135m-instruct"
    served = ScriptedBackend(WORDS, VOWELS, WORDS, WORDS, name=name)
    with serve_openai(served, served_name=name, faults=faults) as base_url:
        settings = make_settings(
            tmp_path / "home",
            backend=BackendSettings(kind="openai", base_url=base_url, model=name,
                                    max_new_tokens=160, max_retries=0),
        )
        assert settings.pipeline.candidates_for(settings.backend.kind) == 4  # the default
        runtime = build_runtime(settings)
        outcome = execute(runtime, submit(runtime, sample_repo))
    assert outcome.state == "succeeded", outcome.error
    chats = [b for b in faults.bodies if b.get("n")]
    assert len(chats) == 1 and chats[0]["n"] == 4 and chats[0]["stream"] is False
    with runtime.store.session() as s:
        rows = s.scalars(select(Candidate).order_by(Candidate.idx)).all()
        assert [r.chosen for r in rows] == [False, True, False, False]


def test_embedded_default_is_one_candidate():
    assert PipelineSettings().candidates_for("transformers") == 1
