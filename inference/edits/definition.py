"""One definition of a Python file: find the function a requirement names, and turn the
model's new version of it into a search/replace answer."""

from __future__ import annotations

import re
from dataclasses import dataclass

from inference.edits.parse import _join, _lines

# ================================================================ one definition


@dataclass(frozen=True)
class Definition:
    """A function or class in a Python file, by its lines (1-based, inclusive)."""

    name: str
    start: int  # first line, decorators included
    body: int  # first line of the body after the docstring (end + 1 if there is none)
    end: int
    indent: str
    stub: bool  # its body only raises NotImplementedError, passes or is `...`
    kind: str = "function"  # or "class"

    def source(self, text: str) -> str:
        return _join(_lines(text)[self.start - 1 : self.end])

    def head(self, text: str) -> str:
        """The lines up to the body: decorators, signature, docstring."""
        return _join(_lines(text)[self.start - 1 : self.body - 1])


def _is_stub(body: list) -> bool:
    import ast

    stmts = list(body)
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(
        getattr(stmts[0], "value", None), ast.Constant
    ) and isinstance(stmts[0].value.value, str):
        stmts = stmts[1:]
    if len(stmts) != 1:
        return not stmts
    only = stmts[0]
    if isinstance(only, ast.Pass):
        return True
    if isinstance(only, ast.Expr) and isinstance(only.value, ast.Constant) and (
        only.value.value is ...
    ):
        return True
    if isinstance(only, ast.Raise) and only.exc is not None:
        exc = only.exc.func if isinstance(only.exc, ast.Call) else only.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def definitions(text: str) -> list[Definition]:
    """Top-level functions and classes, and the methods of top-level classes."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = _lines(text)
    out: list[Definition] = []

    def add(node) -> None:
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        body = node.body
        first = body[0]
        has_doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                   and isinstance(first.value.value, str))
        if has_doc and len(body) > 1:
            body_line = body[1].lineno
        elif has_doc:
            body_line = first.end_lineno + 1
        else:
            body_line = first.lineno
        if body_line <= node.lineno:  # `def f(): return 1` on one line: no body to prefill
            return
        line = lines[node.lineno - 1]
        indent = line[: len(line) - len(line.lstrip())]
        stub = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_stub(node.body)
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        out.append(Definition(node.name, start, body_line, node.end_lineno, indent, stub, kind))

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            add(node)
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(sub)
    return out


def find_definition(text: str, requirement: str) -> Definition | None:
    """The function a requirement asks to implement or change, if the file has it: a named
    stub, else a named function; with no name, the file's only stub. None when the
    requirement calls for a function the file does not define yet (`add slugify(text)`):
    that is new code, not a change to one definition."""
    defs = definitions(text)
    funcs = [d for d in defs if d.kind == "function"]
    names = {d.name for d in defs}
    called = set(re.findall(r"([A-Za-z_]\w*)\(", requirement))
    if called - names - _BUILTIN_CALLS:
        return None
    named = [d for d in funcs if re.search(rf"(?<![\w.]){re.escape(d.name)}(?!\w)", requirement)]
    for group in ([d for d in named if d.stub], named):
        if group:
            return group[0]
    stubs = [d for d in funcs if d.stub]
    return stubs[0] if len(stubs) == 1 else None


_BUILTIN_CALLS = frozenset(
    "print len str int float list dict set tuple range sorted open isinstance min max sum "
    "repr type bool abs round any all map filter zip enumerate".split()
)


def definition_answer(path: str, text: str, definition: Definition, written: str) -> str:
    """A search/replace answer that swaps `definition` in `text` for `written` (the model's
    new version of it: its head as prefilled, then the body up to where it dedents).

    Whatever the model wrote after the definition ends (a second definition, a fence, a
    `__main__` block) is dropped: the edit replaces exactly one definition, by name."""
    body_lines = _lines(written)
    head_n = len(_lines(definition.head(text)))
    kept = body_lines[:head_n]
    for line in body_lines[head_n:]:
        if line.strip().startswith("```"):
            break
        if line.strip() and not line.startswith(definition.indent + " ") and not line.startswith(
            definition.indent + "\t"
        ):
            break  # dedented to the definition's level or less: the definition is over
        kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    if len(kept) <= head_n:
        return ""  # nothing written after the head: no edit, not an emptied definition
    return (
        f"{path}\n<<<<<<< SEARCH\n{definition.source(text)}=======\n{_join(kept)}"
        ">>>>>>> REPLACE\n"
    )
