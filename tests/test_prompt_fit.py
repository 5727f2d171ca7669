"""Prompts that always fit, edits anchored to one definition, retries that differ: the
pipeline with real git repositories, the real store and sandbox, and a scripted backend."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from bot import jobs
from bot.runtime import build_runtime, execute
from bot.settings import RepoConfig
from bot.store.models import JobStage
from inference.edits import EditRejected, apply_edits, definitions, find_definition, parse_edits
from inference.prompts import ContextDoc, PromptTooLong, fit_prompt, prompt_tokens, shorten
from tests.support import git_out
from tests.fakes import ScriptedBackend


def words(text: str) -> int:
    return max(1, len(text) // 4)


def make_repo(root: Path, files: dict[str, str],
              config: str = "test_command: python -m pytest -q\n"):
    root.mkdir(parents=True)
    for path, text in {**files, ".codeloop.yml": config}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "start"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    return root


STUB = '''"""Number helpers."""


def double(x):
    """Twice x."""
    return 2 * x


def square(x):
    """The square of x.

    >>> square(3)
    9
    """
    raise NotImplementedError
'''

TESTS = '''from nums import double, square


def test_double():
    assert double(2) == 4


def test_square():
    assert square(3) == 9
'''


def stages(runtime) -> dict[str, dict]:
    with runtime.store.session() as s:
        return {st.name: st.output for st in s.scalars(select(JobStage).order_by(JobStage.id))
                if st.state == "done"}


# ---------------------------------------------------------------- fit_prompt


def test_every_part_is_packed_into_the_budget_least_useful_first():
    docs = [ContextDoc(f"m{i}.py", f"# file {i}\n" + "x = 1\n" * 400) for i in range(5)]
    errors = "\n".join(f"E   line {i} failed" for i in range(3000)) + "\nFAILED test_x - boom"
    answer = "m0.py\n```python\n" + "y = 2\n" * 3000 + "```\n"
    for budget in (300, 900, 2500, 6000):
        fitted = fit_prompt(budget_tokens=budget, count_tokens=words, context=docs,
                            keep=("m0.py",), requirement="Make x two", edit_format="whole",
                            format_rules="rules", previous_answer=answer, errors=errors)
        assert prompt_tokens(fitted.prompt, words) <= budget
        retry = fitted.prompt.messages[-1].content
        assert "FAILED test_x - boom" in retry  # the end of a test run says what failed
        assert "Make x two" in fitted.prompt.messages[1].content
        # Dropped from the least useful end; the kept file is cut last, if ever.
        kept = [d.path for d in fitted.docs]
        assert kept == [f"m{i}.py" for i in range(len(kept))]
        assert set(fitted.shortened) >= {"errors", "previous_answer"}
    tiny = fit_prompt(budget_tokens=300, count_tokens=words, context=docs, keep=("m0.py",),
                      requirement="Make x two", edit_format="whole", format_rules="rules")
    assert tiny.truncated == ["m0.py"] and tiny.docs[0].text.endswith("... (truncated)\n")
    with pytest.raises(PromptTooLong):
        fit_prompt(budget_tokens=20, count_tokens=words, context=docs, requirement="x",
                   edit_format="whole", format_rules="long rules " * 50)


def test_shorten_keeps_head_and_tail_and_says_what_was_left_out():
    text = "\n".join(f"line {i}" for i in range(1000))
    short = shorten(text, 100, words)
    assert words(short) <= 100 and short.startswith("line 0") and short.endswith("line 999")
    assert "line(s) left out" in short


# ---------------------------------------------------------------- definitions


def test_the_named_stub_is_found_and_new_functions_are_not_mistaken_for_changes():
    implement = "Implement square so that it does what its docstring says"
    assert find_definition(STUB, implement).name == "square"
    assert find_definition(STUB, "Implement the function so its doctest passes").name == "square"
    assert find_definition(STUB, "Make double return three times x").name == "double"
    assert find_definition(STUB, "Add cube(x) next to square") is None
    assert [d.name for d in definitions("def f(:\n")] == []


def test_an_answer_carrying_the_truncation_marker_is_never_applied(tmp_path):
    (tmp_path / "big.py").write_text("a = 1\n" * 50)
    answer = "big.py\n```python\na = 2\n... (truncated)\n```\n"
    with pytest.raises(EditRejected) as err:
        apply_edits(parse_edits(answer, "whole").edits, tmp_path, RepoConfig())
    assert "truncated" in str(err.value) and not err.value.refused
    assert (tmp_path / "big.py").read_text() == "a = 1\n" * 50


# ---------------------------------------------------------------- the pipeline


def test_a_stub_is_replaced_by_name_not_duplicated(sqlite_settings, tmp_path):
    repo = make_repo(tmp_path / "repo", {"nums.py": STUB, "test_nums.py": TESTS})
    prefix_then_body = (
        'nums.py\n```python\ndef square(x):\n    """The square of x.\n\n    >>> square(3)\n'
        '    9\n    """\n    return x * x\n\n\ndef square(x):\n    return 0\n```\n'
    )
    backend = ScriptedBackend(prefix_then_body)
    runtime = build_runtime(sqlite_settings, backend=backend)
    sub = jobs.submit(runtime.store, source="cli", repo=str(repo),
                      requirement="Implement square so that it does what its docstring says",
                      max_bytes=100_000)
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "succeeded", outcome.error
    done = stages(runtime)
    assert done["prompt"]["plan"]["modes"][0] == "definition"
    assert done["prompt"]["prefix"].endswith('    """\n    return ')  # inside the body
    new = git_out(repo, "show", f"{outcome.result['branch']}:nums.py")
    assert new.count("def square") == 1 and "return x * x" in new
    assert "def double" in new and "NotImplementedError" not in new


def test_a_repeated_answer_is_not_validated_again_and_retries_change(sqlite_settings, tmp_path):
    repo = make_repo(tmp_path / "repo", {"nums.py": STUB, "test_nums.py": TESTS})
    wrong = ('nums.py\n```python\ndef square(x):\n    """The square of x."""\n'
             '    return x + x\n```\n')
    backend = ScriptedBackend(wrong)  # the same text every time
    runtime = build_runtime(sqlite_settings, backend=backend)
    sub = jobs.submit(runtime.store, source="cli", repo=str(repo),
                      requirement="Add a cube(x) helper to nums.py", max_bytes=100_000)
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "failed"
    done = stages(runtime)
    assert done["validate-1"].get("validation")  # validated once
    assert done["validate-2"]["duplicate_of"] == 1  # the same answer: recorded, not re-run
    assert "validation" not in done["validate-2"]
    validated = [done[f"validate-{n}"]["answer_sha"] for n in (1, 2, 3)
                 if "validation" in done[f"validate-{n}"]]
    assert len(validated) == len(set(validated))  # no answer validated twice
    s2, s3 = done["generate-2"]["strategy"], done["generate-3"]["strategy"]
    assert s2["temperature"] > done["generate-1"]["strategy"]["temperature"]
    assert s3["temperature"] > s2["temperature"]
    assert s3["mode"] != s2["mode"]  # a repeat makes the next retry ask another way
    assert "asks another way" in s3["why"]
    # The retry prompts quote the failure, with what to do about a repeat.
    assert "What to do" in backend.calls[2][-1].content
    assert "repeats attempt 1" in backend.calls[2][-1].content


def test_a_file_too_big_for_the_prompt_is_never_offered_whole(sqlite_settings, tmp_path):
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(2500))
    repo = make_repo(tmp_path / "repo", {"big.py": body})
    tail = "".join(body.splitlines(keepends=True)[-30:]).rstrip("\n")
    prefix = f"big.py\n```python\n{tail}\n\n\n"
    backend = ScriptedBackend(prefix + "x = 1\n... (truncated)\n")  # the marker, carried on
    runtime = build_runtime(sqlite_settings, backend=backend)
    sub = jobs.submit(runtime.store, source="cli", repo=str(repo),
                      requirement="Add a function g(x) to big.py", max_bytes=100_000)
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "failed"
    done = stages(runtime)
    plan = done["prompt"]["plan"]
    assert "whole-prefill" not in plan["modes"]
    assert plan["modes"] == ["append", "search_replace"]  # new code goes after the file's end
    assert done["prompt"]["prefix"].endswith("return x + 2499\n\n\n")
    assert done["prompt"]["packing"]["truncated"] == ["big.py"]
    for n in (1, 2, 3):
        assert done[f"prompt-{n}" if n > 1 else "prompt"]["packing"]["tokens"] <= plan["budget"]
        assert "... (truncated)" not in done[f"validate-{n}"].get("diff", "")
    assert "truncated" in done["validate-1"]["reason"]
    assert "validation" not in done["validate-1"]  # refused before any check ran
    assert git_out(repo, "status", "--porcelain") == ""


# ---------------------------------------------------------------- the context window


def test_the_context_window_comes_from_the_server():
    from bot.settings import BackendSettings
    from inference.backends.openai_backend import OpenAIBackend
    from tests.openai_server import serve_openai

    with serve_openai(ScriptedBackend("x"), served_name="served", context_tokens=3000) as url:
        with OpenAIBackend(BackendSettings(kind="openai", base_url=url, model="served")) as b:
            assert b.context_window() == 3000  # max_model_len from /v1/models
        capped = BackendSettings(kind="openai", base_url=url, model="served", context_tokens=1024)
        with OpenAIBackend(capped) as b:
            assert b.context_window() == 1024


@pytest.mark.model
def test_the_embedded_model_says_its_own_context(embedded_model_dir):
    from inference.backends.embedded import EMBEDDED_MODEL_NAME
    from inference.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(embedded_model_dir, model_name=EMBEDDED_MODEL_NAME)
    assert backend.context_window() == 8192  # SmolLM2-135M's config, not a 2,048 default
