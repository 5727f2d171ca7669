"""Requirement tests: evidence that a change does what was asked, obtained by execution.

A requirement test is kept only if it fails at the start commit (an assertion, or a name
that does not exist yet) and passes with the change; a test that already passes at the
start proves nothing about the change and is discarded, with the reason recorded.

Where tests come from, in order of trust:

- ``example``: examples stated in the requirement (``f(x) == y``, ``>>>`` lines, "f(x)
  returns y") become assertions directly, without the model;
- ``model``: otherwise the model writes a test in the repository's own layout.

Both run in the sandbox (``bot.validate.run_tests``) with pytest; the same run measures
which changed lines the tests executed (coverage.py, see ``bot.changed_lines``).
"""

from __future__ import annotations

import ast
import builtins
import json
import re
import secrets as _secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bot import changed_lines
from bot.settings import SandboxSettings

MAX_EXAMPLES = 10
_VERBS = (
    r"==|->|→|=>|returns?|should\s+return|must\s+return|will\s+return|would\s+return|"
    r"gives|should\s+give|evaluates\s+to|is"
)
_AFTER_CALL = re.compile(rf"\s*(?:`\s*)?(?:,\s*)?(?:{_VERBS})\s*(?:`\s*)?", re.IGNORECASE)
_NAME_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")
# Exceptions that mean "the behaviour is not there yet"; anything else (a syntax error in
# the test, a type error) means the test itself is broken.
FAIL_KINDS = ("AssertionError", "ImportError", "ModuleNotFoundError", "NameError",
              "AttributeError")
_KEYWORDS = {"def", "class", "lambda", "print", "assert", "return", "if", "while", "for"}


@dataclass(frozen=True)
class Example:
    name: str  # the function called
    call: str  # e.g. count_vowels("Hello World")
    expected: str  # e.g. 3
    text: str  # how the requirement stated it

    @property
    def assertion(self) -> str:
        return f"{self.call} == {self.expected}"


# ---------------------------------------------------------------- extraction


def _closing_paren(text: str, open_at: int) -> int | None:
    depth, quote, i = 0, "", open_at
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i
        elif ch == "\n":
            return None
        i += 1
    return None


def _literal_call(source: str) -> str | None:
    """The call if it is ``name(literal, ...)`` (keyword arguments allowed), else None."""
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    try:
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    if any(k.arg is None for k in node.keywords) or any(
        isinstance(a, ast.Starred) for a in node.args
    ):
        return None
    return ast.unparse(node)


def _literal_prefix(text: str) -> str | None:
    """The longest prefix of ``text`` (one line) that is a Python literal."""
    line = text.split("\n", 1)[0][:300].rstrip()
    for end in range(len(line), 0, -1):
        piece = line[:end].strip()
        if not piece or (end < len(line) and line[end].isalnum() and piece[-1].isalnum()):
            continue  # do not cut a word or a number in two
        if piece.endswith(".") and piece[:-1].strip()[-1:].isdigit():
            continue  # "returns 3." ends a sentence; it is not the float 3.0
        try:
            value = ast.literal_eval(piece)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, (str, bytes)) and not piece[0] in "\"'bB":
            continue
        return ast.unparse(ast.parse(piece, mode="eval").body)
    return None


def extract_examples(text: str) -> list[Example]:
    """Examples the requirement states, as calls with literal arguments and a literal result."""
    found: list[Example] = []
    seen: set[str] = set()

    def add(call: str, expected: str, stated: str) -> None:
        name = call.split("(", 1)[0]
        key = f"{call} == {expected}"
        if name in _KEYWORDS or hasattr(builtins, name) or key in seen:
            return
        if len(found) >= MAX_EXAMPLES:
            return
        seen.add(key)
        found.append(Example(name=name, call=call, expected=expected, text=stated.strip()))

    # Doctest style: `>>> f(x)` and the expected value on the next line.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith(">>> "):
            continue
        call = _literal_call(stripped[4:].strip())
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if call and nxt and not nxt.startswith((">>>", "...")):
            expected = _literal_prefix(nxt)
            if expected is not None:
                add(call, expected, f"{stripped} → {nxt}")

    # Inline: `f(x) == y`, `f(x) returns y`, `f(x) -> y`, "for example f(x) should return y".
    for match in _NAME_CALL.finditer(text):
        start = match.start()
        before = text[max(0, start - 10):start]
        if re.search(r"(?:def|class|>>>)\s+$", before):
            continue
        end = _closing_paren(text, match.end() - 1)
        if end is None:
            continue
        call = _literal_call(text[start:end + 1])
        if call is None:
            continue
        verb = _AFTER_CALL.match(text, end + 1)
        if verb is None:
            continue
        expected = _literal_prefix(text[verb.end():])
        if expected is None:
            continue
        add(call, expected, text[start:verb.end()] + expected)
    return found


# ---------------------------------------------------------------- test files


def test_dir(workdir: Path) -> str:
    """Where the repository keeps its tests: ``tests/``, ``test/`` or the root."""
    for name in ("tests", "test"):
        if (workdir / name).is_dir():
            return name + "/"
    return ""


def _module_of(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts and parts[0] == "src" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


def _is_test_path(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py" \
        or rel.startswith(("tests/", "test/"))


def locate(workdir: Path, name: str, changed: Sequence[str]) -> str | None:
    """The module that defines ``name`` at top level: changed files first, then the rest."""
    def defines(rel: str) -> bool:
        try:
            tree = ast.parse((workdir / rel).read_text(errors="replace"))
        except (OSError, SyntaxError, ValueError):
            return False
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and node.name == name:
                return True
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                return True
        return False

    candidates = [p for p in changed if p.endswith(".py") and not _is_test_path(p)]
    for rel in candidates:
        if (workdir / rel).is_file() and defines(rel):
            return _module_of(rel)
    skip = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist"}
    for path in sorted(workdir.rglob("*.py"))[:2000]:
        rel = path.relative_to(workdir).as_posix()
        if any(part in skip or part.startswith(".") for part in rel.split("/")[:-1]):
            continue
        if not _is_test_path(rel) and defines(rel):
            return _module_of(rel)
    return _module_of(candidates[0]) if candidates else None


def _test_name(example: Example, n: int) -> str:
    return f"test_{example.name}_example_{n}"


def example_test_file(workdir: Path, examples: Sequence[Example], changed: Sequence[str]) -> tuple[
        str, str, dict[str, str]] | None:
    """(path, text, {test id: stated example}) for the examples, or None when nothing to import.

    Each test imports inside its body, so at the start commit a missing function is a
    failing test (a missing name), not a collection error.
    """
    if not examples:
        return None
    names = sorted({e.name for e in examples})
    modules = {n: locate(workdir, n, changed) for n in names}
    if not any(modules.values()):
        return None
    path = f"{test_dir(workdir)}test_requirement_{names[0]}.py"
    n = 1
    while (workdir / path).exists():
        n += 1
        path = f"{test_dir(workdir)}test_requirement_{names[0]}_{n}.py"
    out = ['"""Requirement tests: the examples stated in the requirement (written by codeloop)."""',
           ""]
    stated: dict[str, str] = {}
    counter: dict[str, int] = {}
    for ex in examples:
        module = modules.get(ex.name)
        if module is None:
            continue
        counter[ex.name] = counter.get(ex.name, 0) + 1
        test = _test_name(ex, counter[ex.name])
        out += ["", f"def {test}():", f"    from {module} import {ex.name}", "",
                f"    assert {ex.assertion}", ""]
        stated[f"{path}::{test}"] = ex.text
    return path, "\n".join(out).rstrip() + "\n", stated


# ---------------------------------------------------------------- running them

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


# ---------------------------------------------------------------- the check


def prove(
    workdir: Path, start_sha: str, apply: callable, changed: Sequence[str],
    *, examples: Sequence[Example], model_test: dict | None, test_command: str | None,
    settings: SandboxSettings, secrets: Sequence[str] = (), env_dir: Path | None = None,
) -> dict:
    """Fail-at-start / pass-with-change for the requirement tests, plus changed-line coverage.

    ``apply()`` puts the candidate's change on the working tree (after a reset to
    ``start_sha``). Returns the ``proof`` record the verdict renders; ``proof["ok"]`` is
    False when a kept requirement test fails with the change.
    """
    from bot import workspace

    files: dict[str, str] = {}  # path -> text
    origin: dict[str, str] = {}  # test id or path -> "example" | "model"
    stated: dict[str, str] = {}
    made = example_test_file(workdir, examples, changed)
    if made:
        path, text, stated = made
        files[path] = text
        origin[path] = "example"
    if model_test and model_test.get("path") and model_test["path"] not in files:
        files[model_test["path"]] = model_test["text"]
        origin[model_test["path"]] = "model"
    proof: dict = {"ok": True, "requirement_tests": [], "discarded": [], "files": {},
                   "notes": []}
    if examples and not made:
        proof["notes"].append("the requirement's examples call functions the change does not "
                              "define")

    kept: list[dict] = []
    if files:
        # 1. At the start commit: each test must fail for want of the behaviour.
        workspace.reset(workdir, start_sha)
        for path, text in files.items():
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).write_text(text)
        before = run_in_sandbox(workdir, list(files), settings, secrets, env_dir=env_dir)
        workspace.reset(workdir, start_sha)
        if not before.ok:
            proof["notes"].append(f"requirement tests could not run at the start commit: "
                                  f"{before.problem}")
        collect_failed: dict[str, str] = {}
        for t in before.tests:
            path = t["id"].split("::", 1)[0]
            src = origin.get(path, "model")
            if t["id"].endswith("::<collection>"):
                kind = failure_kind(t["message"])
                if kind in ("ImportError", "ModuleNotFoundError", "NameError", "AttributeError"):
                    collect_failed[path] = kind
                else:
                    proof["discarded"].append({"id": path, "origin": src, "reason":
                                               f"broken at the start commit ({kind})"})
                continue
            entry = {"id": t["id"], "origin": src, "stated": stated.get(t["id"], "")}
            if t["state"] == "passed":
                proof["discarded"].append({**entry, "reason": "passes at the start commit: it "
                                           "does not test the change"})
            elif t["state"] == "skipped":
                proof["discarded"].append({**entry, "reason": "skipped"})
            else:
                kind = failure_kind(t["message"])
                if kind in FAIL_KINDS:
                    kept.append({**entry, "start": kind})
                else:
                    proof["discarded"].append({**entry, "reason": f"broken at the start "
                                               f"commit ({kind})"})
        keep_files = {k["id"].split("::", 1)[0] for k in kept} | set(collect_failed)
        files = {p: t for p, t in files.items() if p in keep_files}
    else:
        collect_failed = {}

    # 2. With the change: the kept tests must pass; measure the changed lines meanwhile.
    workspace.reset(workdir, start_sha)
    apply()
    for path, text in files.items():
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text(text)
    lines = changed_lines.changed_lines(workdir, start_sha, [
        p for p in changed if p.endswith(".py") and not _is_test_path(p)])
    suite = suite_args(test_command)
    after = run_in_sandbox(workdir, list(files), settings, secrets, changed=lines or None,
                           suite=suite, env_dir=env_dir) if (files or lines) else None
    by_id = {t["id"]: t for t in (after.tests if after else [])}
    for path, kind in collect_failed.items():  # a file that could not even import at start
        for tid in by_id:
            if tid.startswith(path + "::") and not tid.endswith("::<collection>"):
                kept.append({"id": tid, "origin": origin.get(path, "model"), "stated": "",
                             "start": kind})
    for k in kept:
        t = by_id.get(k["id"])
        if t is None:
            collected = by_id.get(k["id"].split("::", 1)[0] + "::<collection>")
            k["change"] = "error"
            k["message"] = (collected or {}).get("message", "did not run")[-800:]
        else:
            k["change"] = t["state"]
            if t["state"] != "passed":
                k["message"] = t["message"][-800:]
    # A stated example that fails rejects the change. A test the model wrote may itself be
    # wrong, so when it fails with the change it is reported and dropped (with its file),
    # not used to reject: it only ranks candidates when it passes.
    doubtful = {k["id"].split("::", 1)[0] for k in kept
                if k["origin"] == "model" and k["change"] != "passed"}
    for k in kept:
        if k["id"].split("::", 1)[0] in doubtful:
            reason = ("fails with the change too: the model's test may be wrong, so it was not "
                      "kept" if k["change"] != "passed" else
                      "dropped with its file, where another test failed with the change")
            proof["discarded"].append({"id": k["id"], "origin": k["origin"], "reason": reason,
                                       "message": k.get("message", "")[-400:]})
    kept = [k for k in kept if k["id"].split("::", 1)[0] not in doubtful]
    files = {p: t for p, t in files.items() if p not in doubtful}
    proof["requirement_tests"] = kept
    proof["ok"] = all(k["change"] == "passed" for k in kept)
    proof["files"] = files if proof["ok"] else {}
    if after is not None and not after.ok:
        proof["notes"].append(f"the requirement test run: {after.problem}")
    proof["coverage"] = changed_lines.summarise(lines, after.coverage if after else None,
                                                suite is not None)
    if after is not None and not proof["ok"]:
        proof["output"] = after.output[-2000:]
    workspace.reset(workdir, start_sha)
    return proof


def failures_text(proof: dict) -> str:
    """What the model reads when a requirement test failed with its change."""
    parts = []
    for k in proof.get("requirement_tests", []):
        if k.get("change") != "passed":
            what = f" (the requirement says: {k['stated']})" if k.get("stated") else ""
            parts.append(f"## requirement test {k['id']}{what}\n{k.get('message', '')}")
    return "\n\n".join(parts)[-3000:]


# ---------------------------------------------------------------- a test written by the model

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
