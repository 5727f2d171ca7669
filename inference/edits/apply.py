"""Guarding and applying parsed edits to a working tree.

`check_edits` decides whether a path may be written; `apply_edits` computes every new file
in memory before writing any of them, so a refused or failing edit leaves the working tree
untouched.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bot.ports import FileEdit, SearchReplace
from bot.settings import RepoConfig
from inference.edits.parse import _join, _lines

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
