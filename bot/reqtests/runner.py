"""Running requirement tests with pytest in the sandbox, under coverage of the changed lines,
and reading back their report (a runner script prints it after a nonce)."""

from __future__ import annotations

import json
import re
import secrets as _secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.settings import SandboxSettings

_RUNNER = r'''
import json, os, sys
import xml.etree.ElementTree as ET
nonce, xml_path, cov_path, changed = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
out = {"tests": [], "coverage": None}
try:
    root = ET.parse(xml_path).getroot()
except Exception as exc:
    out["error"] = "no test report: %s" % exc
    root = None
if root is not None:
    for tc in root.iter("testcase"):
        state, message = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                state = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or "") + "\n" + (child.text or "")
        out["tests"].append({"classname": tc.get("classname", ""), "name": tc.get("name", ""),
                             "state": state, "message": message[:1500]})
if changed:
    try:
        import coverage
        cov = coverage.Coverage(data_file=cov_path)
        cov.load()
        files = {}
        for path, lines in changed.items():
            try:
                _, stmts, _, missing, _ = cov.analysis2(os.path.abspath(path))
            except Exception:
                continue
            lines = [n for n in lines if n in set(stmts)]
            files[path] = [lines, [n for n in lines if n not in set(missing)]]
        out["coverage"] = files
    except Exception as exc:
        out["coverage_error"] = "%s: %s" % (type(exc).__name__, exc)
print(nonce + json.dumps(out, separators=(",", ":")))
'''

_PYTEST_COMMAND = re.compile(r"\s*(?:python3?\s+-m\s+)?pytest((?:\s+[-\w./=:]+)*)\s*")


def suite_args(test_command: str | None) -> str | None:
    """The repository's pytest arguments when its test command is plain pytest, else None."""
    if not test_command:
        return None
    m = _PYTEST_COMMAND.fullmatch(test_command)
    return None if m is None else m.group(1).strip()


@dataclass
class Run:
    ok: bool  # the sandbox ran and a report came back
    tests: list[dict]  # {"id", "state", "message"}
    coverage: dict | None  # {path: [executable changed lines, executed ones]}
    output: str  # the sandbox output, marker removed
    problem: str = ""


def run_in_sandbox(
    workdir: Path, files: Sequence[str], settings: SandboxSettings, secrets: Sequence[str] = (),
    *, changed: dict[str, list[int]] | None = None, suite: str | None = None,
    env_dir: Path | None = None,
) -> Run:
    """Run the test ``files`` with pytest in the sandbox (and, with ``changed``, under
    coverage, followed by the repository's own suite when ``suite`` holds its arguments).

    Uses bot.validate.run_tests, so the sandbox's isolation, limits and scrubbing apply.
    """
    from bot.validate import run_tests

    nonce = "CODELOOP-REQTESTS-" + _secrets.token_hex(8) + " "
    tmp = '"${TMPDIR:-/tmp}"'
    xml, cov = f"{tmp}/codeloop-req.xml", f"{tmp}/codeloop-cov"
    quoted = " ".join(shlex.quote(f) for f in files)
    pytest = "-m pytest -q -p no:cacheprovider --tb=short -rfE"
    if changed:
        head = f"python -m coverage run --source=. --data-file={cov} "
        parts = [f"{head}{pytest} --junitxml={xml} {quoted}" if files else "true"]
        if suite is not None:
            parts.append(f"{head}--append -m pytest -q -p no:cacheprovider --tb=no {suite}"
                         " >/dev/null 2>&1")
    else:
        parts = [f"python {pytest} --junitxml={xml} {quoted}"]
    command = "; ".join(parts) + (
        f"; python - {shlex.quote(nonce)} {xml} {cov} "
        f"{shlex.quote(json.dumps(changed or {}))} <<'CODELOOP_EOF'\n{_RUNNER}\nCODELOOP_EOF\n"
    )
    result = run_tests(workdir, command, settings, secrets, env_dir=env_dir)
    text = result.output
    marker = text.rfind(nonce)  # the last one: the runner prints after everything else
    if marker < 0:
        return Run(False, [], None, text, "the test run reported nothing "
                   "(timed out or killed?)")
    line = text[marker + len(nonce):].split("\n", 1)[0]
    shown = text[:marker].rstrip()
    try:
        report = json.loads(line)
    except ValueError:
        return Run(False, [], None, shown, "the test run's report was cut off")
    tests = []
    for t in report.get("tests", []):
        classname, name = t["classname"], t["name"]
        path = classname.replace(".", "/") + ".py" if classname else name.replace(".", "/") + ".py"
        tests.append({"id": f"{path}::{name}" if classname else f"{path}::<collection>",
                      "state": t["state"], "message": t["message"].strip()})
    return Run(True, tests, report.get("coverage"), shown, report.get("error", ""))


def failure_kind(message: str) -> str:
    """The exception a failing test raised: AssertionError, ImportError, SyntaxError, ..."""
    for line in message.splitlines():
        m = re.match(r"\s*(?:E\s+)?([A-Z]\w*(?:Error|Exception))\b", line)
        if m:
            return m.group(1)
        if line.strip().startswith(("assert ", "E       assert")):
            return "AssertionError"
    return "unknown"
