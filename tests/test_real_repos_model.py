"""Real-size repositories with the real embedded model: prompts that always fit, a stub
replaced by name, retries that do not repeat themselves."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from bot import jobs
from bot.runtime import build_runtime, execute
from bot.store.models import JobStage
from tests.support import git_out
from tests.test_prompt_fit import STUB, TESTS, make_repo

pytestmark = pytest.mark.model


def job_stages(runtime) -> list[JobStage]:
    with runtime.store.session() as s:
        rows = list(s.scalars(select(JobStage).order_by(JobStage.id)))
        s.expunge_all()
        return rows


def run(runtime, repo, requirement):
    sub = jobs.submit(runtime.store, source="cli", repo=str(repo), requirement=requirement,
                      max_bytes=100_000)
    return execute(runtime, sub.job_id)


def big_module(n: int = 700) -> str:
    parts = ['"""Geometry helpers, many of them."""\n\nimport math\n\n']
    for i in range(n):
        parts.append(f"def area_{i}(r):\n    \"\"\"Area number {i}.\"\"\"\n"
                     f"    return math.pi * r * r + {i}\n\n\n")
    return "".join(parts)


def test_a_module_over_2000_lines_never_fails_for_prompt_length(sqlite_settings, tmp_path):
    module = big_module()
    assert module.count("\n") > 2000
    repo = make_repo(tmp_path / "repo", {"geometry.py": module,
                                         "test_geometry.py": "from geometry import area_1\n\n\n"
                                         "def test_area():\n    assert area_1(0) == 1\n"})
    runtime = build_runtime(sqlite_settings)
    outcome = run(runtime, repo, "Add a function perimeter(r) to geometry.py that returns "
                                 "the circumference of a circle of radius r.")
    rows = job_stages(runtime)
    by_name = {r.name: r for r in rows}
    prompt = by_name["prompt"].output
    window = prompt["plan"]["window"]
    assert window == 8192  # the model's own context
    assert "whole-prefill" not in prompt["plan"]["modes"]  # the file does not fit whole
    assert prompt["packing"]["truncated"] == ["geometry.py"]
    attempts = [r for r in rows if r.name.startswith("generate-")]
    assert len(attempts) >= 1
    for gen in attempts:  # every attempt reached the model: none failed for its prompt
        assert gen.state == "done", gen.error
        assert gen.output["prompt_tokens"] + sqlite_settings.backend.max_new_tokens <= window
    for row in rows:
        assert "context is" not in (row.error or "")
        if row.name.startswith("validate-"):
            out = row.output
            # Well-formed and validated, or rejected for the model's own text.
            assert out["ok"] or out["reason"], out
            assert "... (truncated)" not in out.get("diff", "")
    if outcome.state == "succeeded":
        new = git_out(repo, "show", f"{outcome.result['branch']}:geometry.py")
        assert "... (truncated)" not in new
    assert git_out(repo, "status", "--porcelain") == ""


def test_a_stub_is_implemented_in_place_and_no_answer_is_validated_twice(sqlite_settings, tmp_path):
    repo = make_repo(tmp_path / "repo", {"nums.py": STUB, "test_nums.py": TESTS})
    runtime = build_runtime(sqlite_settings)
    outcome = run(runtime, repo, "Implement the function square so that it does what its "
                                 "docstring says")
    rows = job_stages(runtime)
    validated = []
    for row in rows:
        if row.name.startswith("validate-") and row.state == "done":
            out = row.output
            if "validation" in out:
                validated.append(out["answer_sha"])
            for check in out.get("validation", {}).get("checks", []):
                assert "F811" not in check["output"]  # never a second `def square`
            diff = out.get("diff", "")
            assert diff.count("+def square") == 0  # the definition line is kept, not added
    story = "\n".join(f"{r.name}: {str(r.output)[:600]}" for r in rows)
    assert validated, story
    assert len(validated) == len(set(validated)), story
    plan = next(r for r in rows if r.name == "prompt").output["plan"]
    assert plan["modes"][0] == "definition" and plan["definition"]["name"] == "square"
    if outcome.state == "succeeded":
        new = git_out(repo, "show", f"{outcome.result['branch']}:nums.py")
        assert new.count("def square") == 1 and "NotImplementedError" not in new
