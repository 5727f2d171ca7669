"""Edit formats: parse a model's answer into file edits, guard them, apply them.

Two formats, both parsed tolerantly because small models write messy answers:

- ``whole``: each changed file's path on a line of its own (or on the fence's info line),
  then a fenced code block with the complete new content.
- ``search_replace``: a path line, then blocks of ``<<<<<<< SEARCH`` / ``=======`` /
  ``>>>>>>> REPLACE``; several blocks for one file accumulate, an empty SEARCH creates a
  new file (or appends to an existing one).

`parse_edits` never raises on any text: what it cannot read becomes a sentence in
`ParsedEdits.problems`. Paths are normalised lexically (quotes, backticks, ``./`` and
backslashes removed) and never resolved here; `check_edits` is the guard that decides
whether a path may be written, and `apply_edits` computes every new file in memory before
writing any of them, so a refused or failing edit leaves the working tree untouched.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bot.ports import FileEdit, ParsedEdits, SearchReplace
from bot.settings import RepoConfig
from inference.prompts_formats import INSTRUCTIONS

__all__ = [
    "FORMATS",
    "EditRejected",
    "apply_edits",
    "check_edits",
    "default_format_for",
    "describe_format",
    "Definition",
    "find_definition",
    "definition_answer",
    "normalize_path",
    "parse_edits",
]

FORMATS: tuple[str, ...] = ("whole", "search_replace")


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


# ================================================================ guarding


class EditRejected(Exception):
    """An edit may not or cannot be applied. The message is written for the requester.

    `reasons` holds one sentence per problem (the message joins them with newlines).
    `refused` is True when a rule forbids the edit (a protected path, outside the
    repository, too big): asking the model again would not help. It is False when the
    edit merely did not fit the file (a SEARCH that matches nowhere or in several places),
    which a new attempt, told the reason, may well fix.
    """

    def __init__(self, message: str, *, reasons: tuple[str, ...] = (), refused: bool = True):
        super().__init__(message)
        self.reasons = reasons or (message,)
        self.refused = refused


def _refuse(reasons: list[str]) -> None:
    if reasons:
        raise EditRejected("\n".join(reasons), reasons=tuple(reasons))


_DRIVE = re.compile(r"^[A-Za-z]:")


def _first_match(globs: list[str], candidates: list[str]) -> str | None:
    """The first glob matching a candidate; case is ignored as a second chance, so that
    `.GitHub/workflows/x.yml` cannot slip past on a case-insensitive file system."""
    for glob in globs:
        for c in candidates:
            if fnmatch.fnmatch(c, glob) or fnmatch.fnmatchcase(c.lower(), glob.lower()):
                return glob
    return None


@dataclass(frozen=True)
class _Target:
    rel: str  # canonical repository-relative path, as the edit named it
    real: Path  # where the bytes go, symbolic links resolved
    real_rel: str  # `real` relative to the repository: the file that changes


def _check_path(raw: str, repo_real: Path, config: RepoConfig) -> tuple[_Target | None, str | None]:
    shown = raw if raw.strip() else repr(raw)
    if not raw.strip():
        return None, "refused: an edit has an empty file path"
    if "\x00" in raw or any(ord(ch) < 32 for ch in raw):
        return None, f"refused: {raw!r} contains control characters"
    if raw.startswith(("/", "\\")) or _DRIVE.match(raw):
        return None, f"refused: {shown} is an absolute path; paths are relative to the repository"
    segments = re.split(r"[/\\]", raw)
    if ".." in segments:
        return None, f"refused: {shown} leaves the repository (a .. segment)"
    if "\\" in raw:
        return None, f"refused: {shown} uses backslashes; write paths with forward slashes"
    if raw.endswith("/"):
        return None, f"refused: {shown} names a directory, not a file"
    rel = "/".join(s for s in segments if s not in ("", "."))
    if not rel:
        return None, f"refused: {shown} is not a file path"
    if any(s.lower() == ".git" for s in rel.split("/")):
        return None, f"refused: {rel} is inside .git/"
    try:
        real = (repo_real / rel).resolve()
    except (OSError, RuntimeError):
        return None, f"refused: {rel} cannot be resolved (a symbolic link loop)"
    if real == repo_real or not real.is_relative_to(repo_real):
        return None, f"refused: {rel} resolves outside the repository (through a symbolic link)"
    real_rel = real.relative_to(repo_real).as_posix()
    via = f" (it points to {real_rel})" if real_rel != rel else ""
    if any(s.lower() == ".git" for s in real_rel.split("/")):
        return None, f"refused: {rel} is inside .git/{via}"
    candidates = [rel] if not via else [rel, real_rel]
    glob = _first_match(config.protected_paths, candidates)
    if glob is not None:
        return None, f"refused: {rel} is a protected path ({glob}){via}"
    if not all(config.is_allowed(c) for c in candidates):
        allowed = ", ".join(config.allowed_paths) or "none"
        return None, f"refused: {rel} is not in the allowed paths ({allowed}){via}"
    if real.is_dir():
        return None, f"refused: {rel} is a directory"
    parent = real.parent
    while parent != repo_real and parent.is_relative_to(repo_real):
        if parent.exists() and not parent.is_dir():
            blocker = parent.relative_to(repo_real).as_posix()
            return None, f"refused: {rel} cannot be written because {blocker} is a file"
        parent = parent.parent
    return _Target(rel, real, real_rel), None


def _encode(rel: str, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise EditRejected(
            f"refused: {rel} would contain characters that cannot be written as UTF-8"
        ) from None


def _content_problem(rel: str, data: bytes, config: RepoConfig) -> str | None:
    if b"\x00" in data:
        return f"refused: {rel} would contain NUL bytes (binary content)"
    if len(data) > config.max_file_bytes:
        return (
            f"refused: {rel} would be {len(data)} bytes, over the limit of "
            f"{config.max_file_bytes} bytes (max_file_bytes)"
        )
    return None


def check_edits(edits: list[FileEdit], repo_dir: Path, config: RepoConfig) -> None:
    """Refuse, before anything is written, any edit the repository's rules do not allow.

    Raises EditRejected naming each refused path and the rule it breaks. Checked: the path
    is relative (no leading slash, no drive letter), has no `..` segment, stays inside
    `repo_dir` once symbolic links are resolved, is not under `.git/`, matches no
    `protected_paths` glob and some `allowed_paths` glob (both as written and where it
    resolves), and whole-file content has no NUL bytes and fits `max_file_bytes`.
    `apply_edits` checks the size of search/replace results once it has computed them.
    """
    _targets(edits, Path(repo_dir), config)


def _targets(edits: list[FileEdit], repo_dir: Path, config: RepoConfig) -> list[_Target]:
    repo_real = repo_dir.resolve()
    reasons: list[str] = []
    targets: list[_Target] = []
    for edit in edits:
        target, reason = _check_path(edit.path, repo_real, config)
        if reason:
            if reason not in reasons:
                reasons.append(reason)
            continue
        assert target is not None
        targets.append(target)
        if edit.content is not None:
            data = _encode(target.rel, edit.content)
            if data and not data.endswith(b"\n"):
                data += b"\n"
            reason = _content_problem(target.rel, data, config)
        else:
            reason = None
        for r in edit.replacements:
            if reason:
                break
            if "\x00" in r.replace:
                reason = f"refused: {target.rel} would contain NUL bytes (binary content)"
            else:
                reason = _content_problem(target.rel, _encode(target.rel, r.replace), config)
        if reason and reason not in reasons:
            reasons.append(reason)
    _refuse(reasons)
    return targets


# ================================================================ applying


@dataclass
class _File:
    rel: str  # as the edit named it, for messages
    real: Path
    real_rel: str  # the file that changes, relative to the repository
    old: bytes | None  # None: the file does not exist yet
    text: str | None  # current text (LF line endings); None until needed for a non-UTF-8 file
    crlf: bool
    trailing_newline: bool


def _load(target: _Target) -> _File:
    if target.real.is_file():
        old = target.real.read_bytes()
        try:
            text = old.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        crlf = old.count(b"\r\n") * 2 > old.count(b"\n") if old else False
        if text is not None and crlf:
            text = text.replace("\r\n", "\n")
        trailing = old.endswith(b"\n") or not old
        return _File(target.rel, target.real, target.real_rel, old, text, crlf, trailing)
    return _File(target.rel, target.real, target.real_rel, None, "", False, True)


def _lines(text: str) -> list[str]:
    """Lines of a text, without their endings; a missing final newline is tolerated."""
    if not text:
        return []
    text = text.removesuffix("\n")
    return text.split("\n")


def _first_line(search: str) -> str:
    for line in search.split("\n"):
        if line.strip():
            return line.strip()[:120]
    return ""


def _find(hay: list[str], needle: list[str]) -> tuple[list[int], str]:
    """Where `needle` occurs in `hay` as whole lines: exactly, then ignoring trailing
    whitespace, then ignoring all surrounding whitespace. The first way that finds
    anything decides; more than one place found is ambiguous."""
    ways = (
        ("exact", lambda s: s),
        ("trailing whitespace ignored", str.rstrip),
        ("surrounding whitespace ignored", str.strip),
    )
    size = len(needle)
    for label, norm in ways:
        want = [norm(x) for x in needle]
        have = [norm(x) for x in hay]
        first = want[0]
        hits = [
            k
            for k in range(len(have) - size + 1)
            if have[k] == first and have[k : k + size] == want
        ]
        if hits:
            return hits, label
    return [], ""


def _reindent(replace: list[str], search: list[str], found: list[str]) -> list[str]:
    """When SEARCH matched only with whitespace ignored, shift REPLACE by the same indent."""
    for s_line, f_line in zip(search, found):
        if s_line.strip():
            s_ind = s_line[: len(s_line) - len(s_line.lstrip())]
            f_ind = f_line[: len(f_line) - len(f_line.lstrip())]
            break
    else:
        return replace
    if f_ind.startswith(s_ind):
        extra = f_ind[len(s_ind) :]
        return [extra + r if r.strip() else r for r in replace]
    if s_ind.startswith(f_ind):
        cut = s_ind[len(f_ind) :]
        return [r.removeprefix(cut) for r in replace]
    return replace


def _apply_replacement(f: _File, sr: SearchReplace) -> None:
    text = f.text or ""
    if not sr.search.strip("\n"):  # empty SEARCH: create the file, or append to it
        if text and not text.endswith("\n"):
            text += "\n"
        f.text = text + sr.replace
        return
    if f.old is None and not text:
        raise EditRejected(
            f"could not edit {f.rel}: the file does not exist, so its SEARCH text cannot match "
            "(leave SEARCH empty to create a new file)",
            refused=False,
        )
    hay = _lines(text)
    needle = _lines(sr.search)
    hits, how = _find(hay, needle)
    first = _first_line(sr.search)
    if not hits:
        raise EditRejected(
            f"could not edit {f.rel}: the SEARCH text was not found in the file "
            f"(first SEARCH line: {first!r})",
            refused=False,
        )
    if len(hits) > 1:
        raise EditRejected(
            f"could not edit {f.rel}: the SEARCH text matches {len(hits)} places "
            f"(first SEARCH line: {first!r}); include more lines to make it unique",
            refused=False,
        )
    k = hits[0]
    new = _lines(sr.replace)
    if how == "surrounding whitespace ignored":
        new = _reindent(new, needle, hay[k : k + len(needle)])
    hay[k : k + len(needle)] = new
    f.text = _join(hay)


def _final_bytes(f: _File) -> bytes:
    text = f.text or ""
    if not f.trailing_newline and text.endswith("\n"):
        text = text[:-1]
    if f.crlf:
        text = text.replace("\n", "\r\n")
    return _encode(f.rel, text)


def apply_edits(edits: list[FileEdit], repo_dir: Path, config: RepoConfig) -> list[str]:
    """Check, compute, then write every edit; returns the changed paths, sorted.

    Every new file content is computed in memory before the first byte is written, so an
    EditRejected (a refused path, a SEARCH that matches nowhere or in several places, a
    result too big) leaves the working tree as it was. Search/replace keeps the file's
    line endings and trailing-newline convention; whole-file content is given a trailing
    newline if it lacks one. A file counts as changed when its bytes differ.
    """
    repo_dir = Path(repo_dir)
    targets = _targets(edits, repo_dir, config)
    files: dict[Path, _File] = {}
    for edit, target in zip(edits, targets):
        f = files.get(target.real)
        if f is None:
            f = files[target.real] = _load(target)
        if edit.content is not None:
            content = edit.content.replace("\r\n", "\n")
            if content and not content.endswith("\n"):
                content += "\n"
            f.text, f.trailing_newline = content, True
        if edit.replacements and f.text is None:
            raise EditRejected(f"could not edit {f.rel}: it is not a UTF-8 text file")
        for sr in edit.replacements:
            _apply_replacement(f, sr)

    planned: list[tuple[_File, bytes]] = []
    reasons: list[str] = []
    for f in files.values():
        if f.text is None:  # a non-UTF-8 file no edit touched the text of
            continue
        if _carries_marker(f):
            raise EditRejected(
                f"could not edit {f.rel}: the new content carries the line "
                f"{TRUNCATION_MARKER!r}, where the prompt had cut the file off; "
                "write only the part you change",
                refused=False,
            )
        data = _final_bytes(f)
        if data == f.old:
            continue
        reason = _content_problem(f.rel, data, config)
        if reason:
            reasons.append(reason)
        planned.append((f, data))
    _refuse(reasons)
    _write_all(planned)
    return sorted(f.real_rel for f, _ in planned)


def _write_all(planned: list[tuple[_File, bytes]]) -> None:
    """Write every file to a temporary neighbour first, then move them all into place."""
    staged: list[tuple[str, Path]] = []
    try:
        for f, data in planned:
            f.real.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=f.real.parent, prefix=".codeloop-", suffix=".tmp")
            staged.append((tmp, f.real))
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            mode = f.real.stat().st_mode & 0o7777 if f.old is not None else 0o644
            os.chmod(tmp, mode)
        for tmp, real in staged:
            os.replace(tmp, real)
    except BaseException:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


TRUNCATION_MARKER = "... (truncated)"  # as inference.context.pack ends a cut-off file


def _carries_marker(f: _File) -> bool:
    """Whether an edit brought in the marker a prompt ends a cut-off file with."""
    new = (f.text or "").splitlines()
    if not any(line.strip() == TRUNCATION_MARKER for line in new):
        return False
    old = (f.old or b"").decode("utf-8", errors="replace").splitlines()
    count = sum(1 for line in old if line.strip() == TRUNCATION_MARKER)
    return sum(1 for line in new if line.strip() == TRUNCATION_MARKER) > count


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


# ================================================================ format choice


def describe_format(fmt: str) -> str:
    """Instructions for the system prompt, with a tiny example, for edit format `fmt`."""
    try:
        return INSTRUCTIONS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown edit format {fmt!r}; expected one of {', '.join(FORMATS)}"
        ) from None


_SIZE = re.compile(r"(?<![\w.])(?:\d+x)?(\d+(?:\.\d+)?)([bm])(?![a-z])")
_SMALL_FAMILIES = ("smollm", "tinyllama", "tiny-", "tiny_", "nano")


def default_format_for(model_name: str) -> str:
    """"whole" for small models (3B parameters or fewer by the name), else "search_replace".

    The size comes from the name (135m, 1.7b, qwen2.5-coder-32b, 8x7b); the largest figure
    counts. A name without a size is small only if it names a small family (smollm,
    tinyllama); any other unknown model gets search_replace.
    """
    name = model_name.lower().rsplit("/", 1)[-1]
    sizes = []
    for m in _SIZE.finditer(name.replace("_", "-")):
        value = float(m.group(1))
        sizes.append(value / 1000 if m.group(2) == "m" else value)
    if sizes:
        return "whole" if max(sizes) <= 3 else "search_replace"
    if any(f in model_name.lower() for f in _SMALL_FAMILIES):
        return "whole"
    return "search_replace"
