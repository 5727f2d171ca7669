"""Rendering training examples: a merged change's diff as the answer in the model's edit
format (whole files or SEARCH/REPLACE blocks), and the prompt the pipeline would build at the
change's base (the same context retrieval), within `training.max_seq_len`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unidiff import PatchSet
from unidiff.errors import UnidiffParseError

from bot.settings import Settings
from bot.store.models import MergedChange
from inference import context as ctx
from inference.edits import describe_format
from inference.prompts import ContextDoc, build_prompt, fence_lang
from training.hygiene import drop_reason_for_path
from training.sources import Checkout, HistorySource

CountTokens = Callable[[str], int]

@dataclass
class FileChange:
    path: str
    binary: bool
    deleted: bool
    hunks: list[list[tuple[str, str]]]  # per hunk: (" " | "-" | "+", the line without "\n")


def split_diff(diff: str) -> list[FileChange]:
    """A unified git diff → one entry per file (parsed by unidiff: renames, binary files,
    "\\ No newline at end of file" markers)."""
    try:
        patch = PatchSet(diff)
    except UnidiffParseError:
        return []
    return [
        FileChange(
            path=pf.path, binary=pf.is_binary_file, deleted=pf.is_removed_file,
            hunks=[[(line.line_type, line.value.rstrip("\r\n")) for line in hunk
                    if line.line_type in (" ", "-", "+")] for hunk in pf],
        )
        for pf in patch
    ]


def change_signature(diff: str, requirement: str = "") -> str:
    """The requirement and the added and removed lines of a diff, without file headers."""
    lines = [line[1:] for line in diff.splitlines()
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return requirement.strip() + "\n" + "\n".join(lines)


def render_whole(files: list[tuple[str, str]]) -> str:
    """The whole-file answer the parser in inference/edits reads: path, then a fenced block."""
    parts = []
    for path, text in files:
        parts.append(f"{path}\n```{fence_lang(path)}\n{text.rstrip()}\n```")
    return "\n\n".join(parts) + "\n"


def render_search_replace(changes: list[FileChange]) -> str:
    """SEARCH/REPLACE blocks from diff hunks: context and removed lines → added lines."""
    out = []
    for ch in changes:
        blocks = []
        for hunk in ch.hunks:
            search = [body for tag, body in hunk if tag in (" ", "-")]
            replace = [body for tag, body in hunk if tag in (" ", "+")]
            blocks.append(
                "<<<<<<< SEARCH\n" + "".join(s + "\n" for s in search) + "=======\n"
                + "".join(r + "\n" for r in replace) + ">>>>>>> REPLACE"
            )
        if blocks:
            out.append(ch.path + "\n" + "\n".join(blocks))
    return "\n\n".join(out) + "\n"


@dataclass
class BuildContext:
    settings: Settings
    fmt: str
    count_tokens: CountTokens
    checkout: Checkout | None
    index_dir: Path
    drops: Counter
    file_drops: Counter
    repo_dir: Path | None = None
    branches: list[str] = field(default_factory=list)
    source: HistorySource | None = None


def requirement_for(change: MergedChange, request_text: str | None) -> str:
    if change.issue_title or change.issue_body:
        return f"{change.issue_title or ''}\n\n{change.issue_body or ''}".strip()
    if request_text:
        return request_text.strip()
    return f"{change.title}\n\n{change.body or ''}".strip()


def prompt_at(c: BuildContext, sha: str | None, requirement: str, feedback: str | None,
               answer_tokens: int, key: str) -> list[dict] | None:
    """The prompt the pipeline would build at commit `sha` (context retrieved the same way),
    with as much context as fits in `max_seq_len` next to the answer."""
    bare = build_prompt(requirement=requirement, context=[], edit_format=c.fmt,
                        format_rules=describe_format(c.fmt), feedback=feedback)
    overhead = sum(c.count_tokens(m.content) + 8 for m in bare.messages)
    budget = c.settings.training.max_seq_len - answer_tokens - overhead - 16
    docs: list[ContextDoc] = []
    if c.checkout is not None and sha and budget > 32:
        c.checkout.checkout(sha)
        index = ctx.RepoIndex(c.index_dir)
        index.update(c.checkout.dir)
        query = requirement + ("\n" + feedback if feedback else "")
        ranked = index.rank(query, k=c.settings.pipeline.context_files * 2)
        if ranked:
            floor = ranked[0].score * c.settings.pipeline.context_min_score
            ranked = [r for r in ranked if r.score >= floor]
        packed = ctx.pack(c.checkout.dir, ranked, budget_tokens=budget,
                          count_tokens=c.count_tokens, max_files=c.settings.pipeline.context_files,
                          min_tokens=min(200, budget))
        docs = [ContextDoc(f.path, f.text) for f in packed]
    prompt = build_prompt(requirement=requirement, context=docs, edit_format=c.fmt,
                          format_rules=describe_format(c.fmt), feedback=feedback)
    return [{"role": m.role, "content": m.content} for m in prompt.messages]


def completion_at(c: BuildContext, base_sha: str | None, diff: str, after_sha: str | None,
                key: str) -> tuple[str | None, list[str], str | None]:
    """(answer in the edit format, paths, drop reason) for the change `diff` on `base_sha`.

    File contents after the change come from `after_sha` when the clone has it, else from
    applying the diff to the base."""
    changes = split_diff(diff)
    if not changes:
        return None, [], "empty_diff"
    kept: list[FileChange] = []
    for ch in changes:
        if ch.deleted:
            continue
        reason = "binary" if ch.binary else drop_reason_for_path(ch.path)
        if reason:
            c.file_drops[reason] += 1
            continue
        kept.append(ch)
    if not kept:
        return None, [], "no_trainable_files"
    if c.fmt == "search_replace":
        return render_search_replace(kept), [k.path for k in kept], None
    if c.checkout is None:
        return None, [], "no_checkout"
    if after_sha and c.checkout.has(after_sha):
        c.checkout.checkout(after_sha)
    elif base_sha and c.checkout.has(base_sha):
        c.checkout.checkout(base_sha)
        if not c.checkout.apply(diff):
            return None, [], "diff_does_not_apply"
    else:
        return None, [], "commit_missing"
    files = []
    for ch in kept:
        text = c.checkout.read(ch.path)
        if text is None:
            continue
        reason = drop_reason_for_path(ch.path, text)
        if reason:
            c.file_drops[reason] += 1
            continue
        files.append((ch.path, text))
    if not files:
        return None, [], "no_trainable_files"
    return render_whole(files), [p for p, _ in files], None
