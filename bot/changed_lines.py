"""Which added or changed lines of a change the tests executed.

``changed_lines`` lists the new line numbers of each changed Python file (against the start
commit); the numbers are measured by coverage.py inside the sandbox (``bot.reqtests``) and
``summarise`` turns them into the figures the verdict prints.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Sequence
from pathlib import Path

from bot import git


def changed_lines(workdir: Path, start_sha: str, paths: Sequence[str]) -> dict[str, list[int]]:
    """{path: line numbers (1-based, in the new file) added or changed since ``start_sha``}."""
    out: dict[str, list[int]] = {}
    for rel in paths:
        path = workdir / rel
        if not path.is_file():
            continue  # deleted
        new = path.read_text(errors="replace").splitlines()
        try:
            old = git.git(workdir, "show", f"{start_sha}:{rel}").splitlines()
        except Exception:  # noqa: BLE001 - a new file: every line is new
            old = []
        lines: list[int] = []
        matcher = difflib.SequenceMatcher(a=old, b=new, autojunk=False)
        for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
            if tag in ("replace", "insert"):
                lines.extend(range(j1 + 1, j2 + 1))
        skip = _import_time_lines("\n".join(new))
        lines = [n for n in lines if new[n - 1].strip() and n not in skip]
        if lines:
            out[rel] = lines
    return out


def _import_time_lines(source: str) -> set[int]:
    """Lines that run when the module is imported, whatever the tests do: ``def``/``class``
    headers and decorators, and docstrings. Counting them would call new code "executed"
    because some test imported its module."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            out.update(range(first, node.body[0].lineno))
            doc = node.body[0]
            if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) \
                    and isinstance(doc.value.value, str):
                out.update(range(doc.lineno, (doc.end_lineno or doc.lineno) + 1))
    return out


def summarise(changed: dict[str, list[int]], measured: dict | None, suite: bool) -> dict:
    """The coverage record: executable changed lines, how many ran, which did not."""
    if not changed:
        return {"measured": False, "reason": "no Python source lines changed"}
    if measured is None:
        return {"measured": False, "reason": "coverage could not be measured"}
    executable = executed = 0
    missed: dict[str, list[int]] = {}
    for path in changed:
        lines, ran = measured.get(path, [[], []])
        executable += len(lines)
        executed += len(ran)
        gone = [n for n in lines if n not in set(ran)]
        if gone:
            missed[path] = gone
    return {"measured": True, "executable": executable, "executed": executed,
            "missed": missed, "existing_suite": suite}
