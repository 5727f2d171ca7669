"""Requirement tests from the requirement's own examples (``f(x) == y``, ``>>>`` lines,
"f(x) returns y"), and the test file that asserts them in the repository's layout."""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inference.paths import is_test_path

MAX_EXAMPLES = 10
_VERBS = (
    r"==|->|→|=>|returns?|should\s+return|must\s+return|will\s+return|would\s+return|"
    r"gives|should\s+give|evaluates\s+to|is"
)
_AFTER_CALL = re.compile(rf"\s*(?:`\s*)?(?:,\s*)?(?:{_VERBS})\s*(?:`\s*)?", re.IGNORECASE)
_NAME_CALL = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")
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


def is_test_code(rel: str) -> bool:
    """A test module or pytest's conftest.py: not where a requirement's behaviour lives."""
    return is_test_path(rel) or rel.rsplit("/", 1)[-1] == "conftest.py"


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

    candidates = [p for p in changed if p.endswith(".py") and not is_test_code(p)]
    for rel in candidates:
        if (workdir / rel).is_file() and defines(rel):
            return _module_of(rel)
    skip = {".git", ".venv", "venv", "node_modules", "__pycache__", "build", "dist"}
    for path in sorted(workdir.rglob("*.py"))[:2000]:
        rel = path.relative_to(workdir).as_posix()
        if any(part in skip or part.startswith(".") for part in rel.split("/")[:-1]):
            continue
        if not is_test_code(rel) and defines(rel):
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
