"""A requirement test the model writes, when the requirement states no examples."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

from bot.reqtests.examples import test_dir

TEST_WRITER_SYSTEM = (
    "You write pytest tests. Given a requirement and repository files, write ONE new test "
    "file that checks the requested behaviour with plain assert statements and concrete "
    "values. Test only what the requirement asks; do not change any other file. Answer with "
    "the file's path on one line, then its complete content in a fenced code block."
)


def model_test_prompt(requirement: str, docs: Sequence[tuple[str, str]], where: str) -> list:
    from bot.ports import Message

    files = "\n\n".join(f"{path}\n```python\n{text}\n```" for path, text in docs)
    user = (f"Repository files:\n\n{files}\n\nRequirement:\n{requirement.strip()}\n\n"
            f"Write the test file {where}test_requirement.py (pytest, importing the code under "
            f"test from its module).")
    return [Message("system", TEST_WRITER_SYSTEM), Message("user", user)]


def parse_model_test(answer: str, workdir: Path) -> tuple[dict | None, str]:
    """({"path", "text"}, "") for a usable test file in the answer, else (None, why not)."""
    from inference.edits import parse_edits

    parsed = parse_edits(answer, "whole")
    for edit in parsed.edits:
        if edit.content is None or not edit.path.endswith(".py"):
            continue
        text = edit.content
        try:
            tree = ast.parse(text)
        except SyntaxError as exc:
            return None, f"the model's test does not parse ({exc.msg}, line {exc.lineno})"
        tests = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name.startswith("test")]
        if not tests:
            return None, "the model's test file has no test function"
        name = edit.path.rsplit("/", 1)[-1]
        if not name.startswith("test_"):
            name = "test_" + name
        path = f"{test_dir(workdir)}{name}"
        if (workdir / path).exists():  # never overwrite the repository's own tests
            path = f"{test_dir(workdir)}test_requirement_model.py"
        return {"path": path, "text": text}, ""
    return None, "the model's answer had no test file"
