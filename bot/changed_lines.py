"""Which added or changed lines of a change the tests executed.

``changed_lines`` lists the new line numbers of each changed Python file (against the start
commit); the numbers are measured by coverage.py inside the sandbox (``bot.reqtests``) and
``summarise`` turns them into the figures the verdict prints.
"""

from __future__ import annotations

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
        lines = [n for n in lines if new[n - 1].strip()]
        if lines:
            out[rel] = lines
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
