"""Requirement tests, changed-line coverage and the verdict, through the real pipeline: real
git, the real sandbox and store; the model's answers are scripted (a fake at the Backend port)."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import select

from bot import jobs, verdict
from bot.github.notifier import render_finished
from bot.reqtests import extract_examples
from bot.runtime import build_runtime, execute
from bot.slack.messages import JobView, succeeded
from bot.store.models import PullRequest
from tests.support import git_out
from tests.fakes import GOOD, ScriptedBackend

HEAD = '''textutil.py
```python
"""Small text helpers."""


def slugify(text):
    """Lower-case words joined by dashes."""
    return "-".join(text.lower().split())


def shout(text):
    """Upper-case text with an exclamation mark."""
    return text.upper() + "!"


'''
WORDS = HEAD + "def count_vowels(text):\n    return len(text.lower().split())\n```\n"
VOWELS = HEAD + ('def count_vowels(text):\n'
                 '    return sum(1 for c in text.lower() if c in "aeiou")\n```\n')
ASKED = ('Add a function count_vowels(text) to textutil.py that returns how many vowels the '
         'text contains. For example, count_vowels("Hello World") returns 3.')


def run(settings, repo, backend, requirement):
    runtime = build_runtime(settings, backend=backend)
    sub = jobs.submit(runtime.store, source="cli", repo=str(repo), requirement=requirement,
                      max_bytes=100_000)
    outcome = execute(runtime, sub.job_id)
    body = None
    with runtime.store.session() as s:
        pr = s.scalar(select(PullRequest))
        body = pr.body if pr else None
    return outcome, body


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ('For example, count_vowels("Hello World") returns 3.', ["count_vowels('Hello World') == 3"]),
    ('slugify("A B") == "a-b" and slugify("") == ""', ["slugify('A B') == 'a-b'",
                                                       "slugify('') == ''"]),
    (">>> add(2, 3)\n5\n>>> add(1, 1)\n2", ["add(2, 3) == 5", "add(1, 1) == 2"]),
    ("mean([1, 2, 3]) -> 2.0", ["mean([1, 2, 3]) == 2.0"]),
    ('parse("1,2") should return [1, 2].', ["parse('1,2') == [1, 2]"]),
    # Not examples: a signature, a variable argument, a builtin, prose after the verb.
    ("def f(x) -> int: returns the count", []),
    ("f(x) returns 3", []),
    ('len("abc") is 3', []),
    ('count("a") is the number of a', []),
])
def test_examples_stated_in_the_requirement_become_assertions(text, expected):
    assert [e.assertion for e in extract_examples(text)] == expected


# ---------------------------------------------------------------- the verdict


def _validation(tests_output="2 passed in 0.5s", proof=None, ok=True):
    checks = [{"name": "syntax", "ok": True, "skipped": False, "output": ""},
              {"name": "ruff", "ok": True, "skipped": False, "output": ""},
              {"name": "tests", "ok": ok, "skipped": False, "output": tests_output}]
    out = {"ok": ok, "summary": "syntax: passed, ruff: passed, tests: passed", "checks": checks}
    if proof is not None:
        out["proof"] = proof
    return out


def test_verdict_names_what_proved_the_change():
    proof = {"requirement_tests": [
        {"id": "tests/t.py::a", "origin": "example", "change": "passed"},
        {"id": "tests/t.py::b", "origin": "model", "change": "passed"}],
        "coverage": {"measured": True, "executable": 6, "executed": 6}}
    assert verdict.line(_validation("41 passed in 3s", proof)) == (
        "requirement tests: 2 tests added (1 from the requirement's examples, 1 written by the "
        "model), fail → pass; existing tests: 41 passed; new lines executed: 6/6")


def test_verdict_says_when_no_test_exercises_the_change():
    proof = {"requirement_tests": [], "coverage": {"measured": True, "executable": 3,
                                                   "executed": 0}}
    text = verdict.line(_validation("2 passed", proof))
    assert text.startswith("no test exercises the new code")
    assert "new lines executed: 0/3" in text and "tests: passed" not in text


def test_verdict_without_measurements_never_claims_a_bare_pass():
    text = verdict.line(_validation("2 passed"))
    assert "not measured" in text and "tests: passed" not in text
    failed = verdict.line(_validation("1 failed, 1 passed", ok=False))
    assert failed.startswith("FAILED: tests") and "1 failed" in failed


# ---------------------------------------------------------------- end to end


def test_requirement_example_fails_at_start_and_passes_with_the_change(settings, sample_repo):
    backend = ScriptedBackend(WORDS, VOWELS)
    outcome, body = run(settings, sample_repo, backend, ASKED)
    assert outcome.state == "succeeded", outcome.error
    # The word-counting answer was caught by the requirement's own example and retried.
    assert outcome.result["attempt"] == 2
    retry = backend.calls[1][-1].content
    assert "count_vowels(\"Hello World\") returns 3" in retry and "assert 2 == 3" in retry
    proof = outcome.result["validation"]["proof"]
    [kept] = proof["requirement_tests"]
    assert (kept["origin"], kept["start"], kept["change"]) == ("example", "ImportError", "passed")
    assert proof["coverage"]["executable"] == proof["coverage"]["executed"] == 1
    # The pull request contains the test, and its body says what was proven and by whom.
    branch = outcome.result["branch"]
    test_file = git_out(sample_repo, "show", f"{branch}:tests/test_requirement_count_vowels.py")
    assert "assert count_vowels('Hello World') == 3" in test_file
    assert ("requirement tests: 1 test added (1 from the requirement's examples), fail → pass; "
            "existing tests: 2 passed; new lines executed: 1/1") in body
    assert "tests: passed" not in body


@pytest.fixture
def auto_settings(tmp_path):
    """The model writes a test when the requirement states no example (the default on an
    OpenAI-compatible server; the embedded model's default is stated examples only)."""
    from bot.settings import PipelineSettings
    from tests.support import make_settings

    return make_settings(tmp_path / "home", pipeline=PipelineSettings(requirement_tests="auto"))


def test_model_test_that_passes_at_the_start_is_discarded(auto_settings, sample_repo):
    proves_nothing = ("tests/test_whisper.py\n```python\nfrom textutil import shout\n\n\n"
                      "def test_whisper():\n    assert shout(\"hi\") == \"HI!\"\n```\n")
    backend = ScriptedBackend(GOOD, tests=(proves_nothing,))
    outcome, body = run(auto_settings, sample_repo, backend, "Add a whisper(text) helper")
    assert outcome.state == "succeeded", outcome.error
    proof = outcome.result["validation"]["proof"]
    assert proof["requirement_tests"] == []
    [gone] = proof["discarded"]
    assert gone["origin"] == "model" and "passes at the start commit" in gone["reason"]
    assert "discarded `tests/test_whisper.py::test_whisper`" in body
    # Not in the pull request.
    files = git_out(sample_repo, "ls-tree", "-r", "--name-only", outcome.result["branch"])
    assert "tests/test_whisper.py" not in files.split()


def test_model_test_that_fails_at_the_start_is_kept_and_labelled(auto_settings, sample_repo):
    real = ("tests/test_whisper.py\n```python\nfrom textutil import whisper\n\n\n"
            "def test_whisper():\n    assert whisper(\"HI\") == \"hi...\"\n```\n")
    backend = ScriptedBackend(GOOD, tests=(real,))
    outcome, body = run(auto_settings, sample_repo, backend, "Add a whisper(text) helper")
    assert outcome.state == "succeeded", outcome.error
    [kept] = outcome.result["validation"]["proof"]["requirement_tests"]
    assert kept["origin"] == "model" and kept["start"] == "ImportError"
    assert "1 written by the model), fail → pass" in body
    assert "written by the model — check that it tests what was asked" in body
    assert "tests/test_whisper.py" in git_out(
        sample_repo, "ls-tree", "-r", "--name-only", outcome.result["branch"]).split()


def test_change_no_test_executes_is_reported_everywhere(sqlite_settings, sample_repo):
    # No example, no usable model test, and the existing tests never call whisper().
    outcome, body = run(sqlite_settings, sample_repo, ScriptedBackend(GOOD),
                        "Add a whisper(text) helper")
    assert outcome.state == "succeeded", outcome.error
    result = outcome.result
    assert "no test exercises the new code" in body and "new lines executed: 0/1" in body
    slack = succeeded(JobView(job_id=1, request_id=1, repo="o/r", kind="create",
                              state="succeeded", started=datetime(2026, 1, 1),
                              now=datetime(2026, 1, 1, 0, 1), result=result))
    assert "no test exercises the new code" in slack.blocks[0]["text"]["text"]
    github = render_finished(1, "create", True, "", result)
    assert "no test exercises the new code" in github
    for text in (body, slack.blocks[0]["text"]["text"], github):
        assert "tests: passed" not in text


def test_requirement_tests_off_says_so(tmp_path, sample_repo):
    from bot.settings import PipelineSettings
    from tests.support import make_settings

    settings = make_settings(tmp_path / "home",
                             pipeline=PipelineSettings(requirement_tests="off"))
    outcome, body = run(settings, sample_repo, ScriptedBackend(WORDS), ASKED)
    # Without requirement tests the word counter gets through — and the verdict admits
    # that nothing measured it.
    assert outcome.state == "succeeded"
    assert "requirement tests and coverage were not measured" in body


@pytest.mark.parametrize("text", [
    '__import__("os").system("touch /tmp/pwned") == 0',
    'exec("import os") returns None',
    'eval("1+1") == 2',
    'getattr(obj, "x") returns 1',
    'f(open("/etc/passwd")) == 1',
    'f(x=__import__("os")) == 1',
    'f(1) == __import__("os")',
])
def test_requirement_text_cannot_smuggle_code_into_a_test(text):
    # Only calls of a plain name with literal arguments and a literal result are taken; the
    # assertion is re-rendered from the parsed literals, never copied from the text.
    assert extract_examples(text) == []


def test_model_test_cannot_escape_or_overwrite(tmp_path):
    from bot.reqtests import parse_model_test

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_textutil.py").write_text("# the repository's own\n")
    escape = "../../etc/cron.d/x.py\n```python\ndef test_a():\n    assert 1\n```\n"
    test, _ = parse_model_test(escape, tmp_path)
    assert test["path"] == "tests/test_x.py"
    clobber = "tests/test_textutil.py\n```python\ndef test_a():\n    assert 1\n```\n"
    test, _ = parse_model_test(clobber, tmp_path)
    assert test["path"] == "tests/test_requirement_model.py"
    test, why = parse_model_test("tests/test_a.py\n```python\ndef test_a(:\n```\n", tmp_path)
    assert test is None and "does not parse" in why


def test_model_test_failing_with_the_change_is_reported_not_trusted(auto_settings, sample_repo):
    # A small model's test can be wrong; it must not veto a change the way a stated example
    # does. It is dropped, and the pull request says why.
    wrong = ("tests/test_whisper.py\n```python\nfrom textutil import whisper\n\n\n"
             "def test_whisper():\n    assert whisper(\"HI\") == \"HI!!!\"\n```\n")
    backend = ScriptedBackend(GOOD, tests=(wrong,))
    outcome, body = run(auto_settings, sample_repo, backend, "Add a whisper(text) helper")
    assert outcome.state == "succeeded", outcome.error
    proof = outcome.result["validation"]["proof"]
    assert proof["requirement_tests"] == []
    [gone] = proof["discarded"]
    assert "the model's test may be wrong" in gone["reason"]
    assert "discarded `tests/test_whisper.py::test_whisper` (model)" in body
    assert "tests/test_whisper.py" not in git_out(
        sample_repo, "ls-tree", "-r", "--name-only", outcome.result["branch"]).split()


def test_review_that_states_an_example_gets_a_requirement_test(sqlite_settings, sample_repo):
    from feedback.signals import record_local_review

    revised = GOOD.replace('return text.lower() + "..."', 'return text.lower() + "…"')
    wrong = GOOD.replace('return text.lower() + "..."', 'return text.lower() + "!"')
    backend = ScriptedBackend(GOOD, wrong, revised)
    runtime = build_runtime(sqlite_settings, backend=backend)
    first = execute(runtime, jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                                         requirement="Add a whisper(text) helper",
                                         max_bytes=100_000).job_id)
    assert first.state == "succeeded", first.error
    review = record_local_review(
        runtime.store, first.result["pull_request_id"], kind="changes_requested",
        body='Use a real ellipsis: whisper("HI") should return "hi…"', author="rev")
    wanted = review.revision  # recording starts nothing: the edge submits the revision
    job_id, _ = jobs.submit_revision(runtime.store, request_id=wanted.request_id,
                                     pull_request_id=wanted.pull_request_id,
                                     feedback=wanted.feedback, key=wanted.key)
    second = execute(runtime, job_id)
    # A wrong revision fails the reviewer's example; the retry passes it.
    assert second.state == "succeeded", second.error
    assert second.result["attempt"] == 2
    assert "assert 'hi!' == 'hi…'" in backend.calls[2][-1].content
    [kept] = second.result["validation"]["proof"]["requirement_tests"]
    assert kept["origin"] == "example" and kept["stated"].startswith('whisper("HI")')
    assert kept["start"] == "AssertionError" and kept["change"] == "passed"
