"""Parsing a model's answer into file edits (the `whole` and `search_replace` formats).

`parse_edits` never raises on any text: what it cannot read becomes a sentence in
`ParsedEdits.problems`. Paths are normalised lexically here and never resolved: the guard
in `inference.edits.apply` decides whether a path may be written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bot.ports import FileEdit, ParsedEdits, SearchReplace
from inference.edits.formats import FORMATS

# ================================================================ paths in model output

# File extensions and extension-less names that make a token a file path with confidence.
_KNOWN_EXT = frozenset(
    ["py", "pyi", "pyx", "pxd", "ipynb", "js", "jsx", "mjs", "cjs", "ts", "tsx", "json", "jsonc", "json5", "yaml", "yml", "toml", "ini", "cfg", "conf", "md", "markdown", "mdx", "rst", "txt", "adoc", "html", "htm", "css", "scss", "sass", "less", "sql", "sh", "bash", "zsh", "fish", "ps1", "bat", "cmd", "rs", "go", "mod", "sum", "java", "kt", "kts", "scala", "groovy", "swift", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "hxx", "m", "mm", "cs", "fs", "vb", "rb", "erb", "php", "pl", "pm", "lua", "r", "jl", "dart", "ex", "exs", "erl", "hrl", "hs", "elm", "ml", "mli", "clj", "cljs", "vue", "svelte", "astro", "xml", "xsl", "svg", "csv", "tsv", "lock", "env", "gradle", "properties", "tf", "tfvars", "hcl", "proto", "graphql", "gql", "dockerfile", "mk", "cmake", "in", "tpl", "j2", "jinja", "jinja2", "vim", "el", "nix", "zig", "nim", "sol", "bzl", "bazel", "cue", "rego", "pem", "key", "crt", "cer", "tex", "bib", "gitignore", "gitattributes", "editorconfig", "dockerignore"]
)
_KNOWN_NAMES = frozenset(
    ["makefile", "gnumakefile", "dockerfile", "containerfile", "license", "licence", "copying", "readme", "changelog", "procfile", "gemfile", "rakefile", "jenkinsfile", "vagrantfile", "justfile", "codeowners", "authors", "notice", "brewfile", "pipfile", "caddyfile"]
)
_PATH_CHARS = re.compile(r"^[\w.\-/\\~@+:]+$")
_HAS_LETTER = re.compile(r"[^\W\d_]")
_LEADING_MARKUP = re.compile(r"^(?:#{1,6}[ \t]*|[-*+][ \t]+|\d{1,3}[.)][ \t]+|>[ \t]*)+")
_LABEL = re.compile(
    r"^(?:\*\*|__)?[ \t]*(?:(?:new|updated|modified|changed|full|complete|edited)[ \t]+)?"
    r"(?:file[ \t]*name|filename|file|path)(?:[ \t]*:[ \t]*|[ \t]+)(?:\*\*|__)?[ \t]*",
    re.IGNORECASE,
)
_WRAPPERS = "`*'\" \t"
_QUOTED = re.compile(r"`([^`\n]+)`|\*\*([^*\n]+)\*\*")
_WORD_PUNCT = "()[]{}<>,;:'\"`*!?"
_COMMENT_LINE = re.compile(r"^\s*(?:#|//|--|/\*|<!--|;|%)\s*(?P<rest>.*?)\s*(?:\*/|-->)?\s*$")


def normalize_path(raw: str) -> str:
    """Lexical clean-up of a path as a model wrote it; never touches the file system.

    Strips surrounding whitespace, quotes, backticks and bold markers and a trailing colon,
    turns backslashes into forward slashes, drops ``./`` segments and doubled slashes.
    ``..`` and a leading ``/`` are kept so that `check_edits` can refuse them.
    """
    s = raw.strip()
    prev = None
    while s != prev:
        prev = s
        s = s.strip(_WRAPPERS)
        s = s.removesuffix(":")
    s = s.replace("\\", "/")
    absolute = s.startswith("/")
    parts = [p for p in s.split("/") if p not in ("", ".")]
    out = "/".join(parts)
    return "/" + out if absolute else out


def _path_strength(token: str) -> int:
    """0: not a path; 1: could be a path (a bare line); 2: surely a path."""
    if not token or len(token) > 300 or "://" in token:
        return 0
    if not _PATH_CHARS.match(token) or not _HAS_LETTER.search(token):
        return 0
    if token.endswith((".", "/", "\\", ":")) or token.startswith(("-", "+", "@")):
        return 0
    name = re.split(r"[/\\]", token)[-1]
    if not name or not _HAS_LETTER.search(name):
        return 0
    lower = name.lower()
    base, dot, ext = lower.rpartition(".")
    if "/" in token or "\\" in token:
        return 2
    if lower in _KNOWN_NAMES or lower == ".env":
        return 2
    if dot and base and ext in _KNOWN_EXT:
        return 2
    if dot and not base:  # a dotfile such as .gitignore, but not a bare ".py"
        return 2 if ext not in _KNOWN_EXT or ext in ("gitignore", "editorconfig") else 0
    if dot and base and ext:
        return 1
    return 0


def _strip_line_markup(line: str) -> str:
    s = line.strip()
    s = _LEADING_MARKUP.sub("", s)
    s = _LABEL.sub("", s, count=1)
    return s.strip()


def _path_from_line(line: str, *, allow_prose: bool = True) -> str | None:
    """The file path a line names, if it names one."""
    if len(line) > 500:
        return None
    s = _strip_line_markup(line)
    if not s:
        return None
    bare = s
    prev = None
    while bare != prev:
        prev = bare
        bare = bare.strip(_WRAPPERS)
        bare = bare.removesuffix(":")
    if bare and not any(ch.isspace() for ch in bare):
        return normalize_path(bare) if _path_strength(bare) else None
    if not allow_prose:
        return None
    # Prose: a quoted token (`x.py`, **x.py**) first, then a plain word; the last one wins.
    quoted = [a or b for a, b in _QUOTED.findall(s)]
    for token in reversed(quoted):
        token = token.strip(_WRAPPERS)
        if _path_strength(token) == 2:
            return normalize_path(token)
    for word in reversed(s.split()):
        word = word.strip(_WORD_PUNCT).rstrip(".")
        if _path_strength(word) == 2:
            return normalize_path(word)
    return None


def _path_from_info(info: str) -> str | None:
    """A path on a fence's info line: ```python src/x.py, ```src/x.py, ```py title="x.py"."""
    for token in info.split():
        token = re.sub(r"^(?:title|file|filename|path)=", "", token, flags=re.IGNORECASE)
        token = token.strip(_WRAPPERS + "{}")
        if ":" in token and not re.match(r"^[A-Za-z]:[/\\]", token):
            lang, _, rest = token.partition(":")
            if lang.isalnum() and rest:
                token = rest
        if _path_strength(token) == 2:
            return normalize_path(token)
    return None


# ================================================================ fences and markers

_FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})(?P<info>[^\n]*)$")
_SEARCH = re.compile(r"^[ \t]*<{5,9}[ \t]*SEARCH[ \t]*$", re.IGNORECASE)
_DIVIDER = re.compile(r"^[ \t]*={5,9}[ \t]*$")
_REPLACE = re.compile(r"^[ \t]*>{5,9}[ \t]*REPLACE[ \t]*$", re.IGNORECASE)
_ELIDED = re.compile(
    r"^\s*(?:#|//|/\*|<!--|--)\s*(?:\.\.\.|…)\s*\(?\s*"
    r"(?:rest|existing|remaining|other|unchanged|same|previous)\b",
    re.IGNORECASE,
)
_MARKDOWN_EXT = (".md", ".markdown", ".mdx", ".rst", ".txt", ".adoc", ".ipynb")


@dataclass(frozen=True)
class _Fence:
    char: str
    length: int
    info: str


def _fence_open(line: str) -> _Fence | None:
    m = _FENCE.match(line)
    if not m:
        return None
    fence, info = m.group("fence"), m.group("info").strip()
    if fence[0] == "`" and "`" in info:
        return None  # inline code such as ```x```, not a fence
    return _Fence(fence[0], len(fence), info)


def _is_close(line: str, fence: _Fence) -> bool:
    s = line.strip()
    return len(s) >= fence.length and s == fence.char * len(s)


def _split_lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _lines(text: str) -> list[str]:
    """Lines of a text, without their endings; a missing final newline is tolerated."""
    if not text:
        return []
    text = text.removesuffix("\n")
    return text.split("\n")


def _starts_file(lines: list[str], body_start: int, index: int, fence: _Fence) -> bool:
    """Whether a fence met inside an open block starts the next file's block instead: it
    names a path itself, or the nearest non-blank line above it is a bare path."""
    if _path_from_info(fence.info):
        return True
    j = index - 1
    while j >= body_start and not lines[j].strip():
        j -= 1
    return j >= body_start and _path_from_line(lines[j], allow_prose=False) is not None


# What a fence's language says about the file in it, for paths only mentioned in prose:
# "Run `pytest tests/test_app.py`:" above a ```bash block does not make that block the
# new content of tests/test_app.py.
_NOT_A_FILE = frozenset()
_LANGUAGE_EXT: dict[str, frozenset[str]] = {
    **dict.fromkeys(("python", "py", "python3"), frozenset({"py", "pyi", "pyw"})),
    **dict.fromkeys(("bash", "sh", "shell", "zsh"), frozenset({"sh", "bash", "zsh"})),
    **dict.fromkeys(("console", "shell-session", "terminal", "output", "pycon"), _NOT_A_FILE),
    **dict.fromkeys(("javascript", "js"), frozenset({"js", "mjs", "cjs", "jsx"})),
    **dict.fromkeys(("typescript", "ts"), frozenset({"ts", "tsx", "mts", "cts"})),
    **dict.fromkeys(("yaml", "yml"), frozenset({"yaml", "yml"})),
    "json": frozenset({"json", "jsonc", "json5"}),
    "toml": frozenset({"toml"}),
}


def _language_fits(info: str, path: str) -> bool:
    words = info.split()
    lang = words[0].lower() if words else ""
    allowed = _LANGUAGE_EXT.get(lang)
    if allowed is None:
        return True
    name = path.rsplit("/", 1)[-1].lower()
    return "." in name and name.rsplit(".", 1)[1] in allowed


def _path_before(lines: list[str], index: int, stop: int, info: str = "") -> str | None:
    """The path named just above `lines[index]`, looking no further up than `stop`.

    The nearest non-blank line may be prose that mentions the path (`Here is x.py:`) if
    the fence's language (`info`) fits the path; up to two more lines above it are
    accepted only when they are a bare path.
    Fence lines are skipped, but a path on a fence's info line counts.
    """
    seen = 0
    j = index - 1
    while j >= stop and seen < 3:
        line = lines[j]
        j -= 1
        if not line.strip():
            continue
        fence = _fence_open(line)
        if fence is not None:
            path = _path_from_info(fence.info)
            if path:
                return path
            continue
        if _SEARCH.match(line) or _DIVIDER.match(line) or _REPLACE.match(line):
            return None
        path = _path_from_line(line, allow_prose=False)
        if path:
            return path
        if seen == 0:
            path = _path_from_line(line)
            if path:
                return path if _language_fits(info, path) else None
        seen += 1
    return None


# ================================================================ parsing


def parse_edits(text: str, fmt: str) -> ParsedEdits:
    """Read the edits in a model's answer. Never raises for any `text`.

    `fmt` is "whole" or "search_replace" (a ValueError otherwise: that is a caller's bug).
    Text that cannot be read becomes a sentence in `problems`. An answer cut off inside a
    code block keeps what was there as an edit and records the problem, so that
    `ParsedEdits.well_formed` is false and the caller can ask again.
    """
    if fmt == "whole":
        result = _parse_whole(text)
    elif fmt == "search_replace":
        result = _parse_search_replace(text)
    else:
        raise ValueError(f"unknown edit format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not result.edits and not result.problems:
        result.problems.append("no file edits found in the answer")
    return result


def _parse_whole(text: str) -> ParsedEdits:
    lines = _split_lines(text)
    n = len(lines)
    contents: dict[str, str] = {}
    problems: list[str] = []
    i = 0
    stop = 0  # lines above this belong to an earlier block
    while i < n:
        fence = _fence_open(lines[i])
        if fence is None:
            i += 1
            continue
        path = _path_from_info(fence.info) or _path_before(lines, i, stop, fence.info)
        body_start = i + 1
        depth = 0
        j = body_start
        end_reason = "eof"
        next_start = n
        while j < n:
            line = lines[j]
            if depth > 0 and _is_close(line, _Fence(fence.char, 3, "")):
                depth -= 1  # closes a fenced example inside the file
            elif _is_close(line, fence):
                end_reason = "closed"
                next_start = j + 1
                break
            else:
                inner = _fence_open(line)
                if inner is not None and inner.info and inner.char == fence.char:
                    if depth == 0 and _starts_file(lines, body_start, j, inner):
                        end_reason = "next"  # a new file's block: this one was never closed
                        break
                    depth += 1  # a fenced example inside the file (markdown, docstrings)
            j += 1
        body = lines[body_start:j]
        if end_reason == "eof":
            while body and not body[-1].strip():
                body.pop()
        elif end_reason == "next":
            # The new block's path line (if any) belongs to the new block, not to this one.
            k = len(body)
            while k > 0 and not body[k - 1].strip():
                k -= 1
            if k > 0 and _path_from_line(body[k - 1], allow_prose=False):
                k -= 1
            next_start = body_start + k
            body = body[:k]
            while body and not body[-1].strip():
                body.pop()
        if path is None and body:
            m = _COMMENT_LINE.match(body[0])
            if m and m.group("rest"):
                path = _path_from_line(m.group("rest"), allow_prose=False)
                if path and _path_strength(path) < 2:
                    path = None
        if path is None:
            problems.append(f"code block without a file path (line {i + 1})")
        else:
            if end_reason == "eof":
                problems.append(f"answer ended inside a code block for {path}")
            elif end_reason == "next":
                problems.append(f"code block for {path} was not closed before the next file")
            if any(_SEARCH.match(b) or _REPLACE.match(b) for b in body):
                problems.append(
                    f"code block for {path} contains SEARCH/REPLACE markers; "
                    "the whole format needs the complete file"
                )
            elif any(_ELIDED.match(b) for b in body):
                problems.append(
                    f"code block for {path} leaves out part of the file; "
                    "write the complete file"
                )
            contents.pop(path, None)  # a later block for the same file replaces the earlier one
            contents[path] = _join(body)
        i = next_start
        stop = next_start
    edits = [FileEdit(path=p, content=c) for p, c in contents.items()]
    return ParsedEdits(edits=edits, problems=problems)


def _parse_search_replace(text: str) -> ParsedEdits:
    lines = _split_lines(text)
    blocks: dict[str, list[SearchReplace]] = {}
    problems: list[str] = []
    state = "out"  # "out" | "search" | "replace"
    path: str | None = None
    last_path: str | None = None
    search: list[str] = []
    replace: list[str] = []
    stop = 0

    def start(index: int) -> None:
        nonlocal path, search, replace, state
        path = _path_before(lines, index, stop) or path or last_path
        search, replace, state = [], [], "search"

    def name() -> str:
        return path or "a file without a path"

    for index, line in enumerate(lines):
        if state == "out":
            if _SEARCH.match(line):
                start(index)
            elif _REPLACE.match(line):
                problems.append(f"'>>>>>>> REPLACE' without a SEARCH block (line {index + 1})")
                stop = index + 1
        elif state == "search":
            if _DIVIDER.match(line):
                state = "replace"
            elif _SEARCH.match(line):
                problems.append(f"SEARCH/REPLACE block for {name()} has no ======= line")
                stop = index
                start(index)
            elif _REPLACE.match(line):
                problems.append(f"SEARCH/REPLACE block for {name()} has no ======= line")
                state, stop = "out", index + 1
            else:
                search.append(line)
        else:  # replace
            if _REPLACE.match(line):
                if path is None:
                    problems.append(f"SEARCH/REPLACE block without a file path (line {index + 1})")
                else:
                    blocks.setdefault(path, []).append(SearchReplace(_join(search), _join(replace)))
                    last_path = path
                state, stop = "out", index + 1
            elif _SEARCH.match(line):
                problems.append(f"SEARCH/REPLACE block for {name()} has no >>>>>>> REPLACE line")
                stop = index
                start(index)
            else:
                replace.append(line)
    if state != "out":
        problems.append(f"answer ended inside a SEARCH/REPLACE block for {name()}")
    edits = [FileEdit(path=p, replacements=tuple(rs)) for p, rs in blocks.items()]
    return ParsedEdits(edits=edits, problems=problems)
