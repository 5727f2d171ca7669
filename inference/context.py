"""Repository context for a requirement: index the files, rank them, pack the best into a budget.

Three steps, each a plain function or method with typed inputs:

1. `RepoIndex.update(repo_dir)` (or `index_repository`) lists the files git knows about
   (tracked, plus untracked files that are not ignored), drops what a model should never
   read (binaries, vendored trees, lock/minified/generated files, very large files) and
   analyses the rest (inference/index.py). The assembled index (inference/corpus.py) is kept
   on disk with the blob id of every file in it, so indexing again after a small change, in
   this process or a fresh one, reads only the files whose content changed and patches their
   rows.
2. `RepoIndex.rank(requirement)` scores files (inference/rank.py).
3. `pack(...)` reads the ranked files best-first into a token budget, cutting the last one at
   a line boundary when it does not fit whole.

Nothing here holds module-level state; all work happens in functions and on `RepoIndex`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from inference import corpus as store
from inference.corpus import Corpus
from inference.index import (
    Chunk,
    ContextError,
    FileAnalysis,
    IndexedFile,
    IndexOptions,
    IndexStats,
    ListedFile,
    analyse,
    analysis_key,
    hash_paths,
    list_repository,
)
from inference.paths import path_skip_reason
from inference.prompts import truncate_lines
from inference.rank import RankWeights, ScoredFile, rank
from inference.tokens import Tokenizer

# Bump when the analysis (tokenizer, stemmer, chunking, symbol extraction) or the cache
# file's layout changes: an old cache file is then ignored instead of mixing two kinds.
ANALYSIS_VERSION = 3  # 3: one file holds the assembled index (inference/corpus.py)
CACHE_FILE_NAME = "context-corpus.bin"
_EARLIER_CACHE_FILES = ("context-index.json", "context-rows.npz")  # versions 1 and 2


class RepoIndex:
    """The index of one repository, cached on disk in `cache_dir`.

    `cache_dir` belongs to one repository (its workspaces may come and go: what is cached is
    looked up by blob id, not by path). It holds one file, replaced atomically: the assembled
    index of the files last indexed, and which blobs were skipped for their content.
    """

    def __init__(
        self,
        cache_dir: Path,
        options: IndexOptions | None = None,
        weights: RankWeights | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.options = options or IndexOptions()
        self.weights = weights or RankWeights()
        self._corpus: Corpus | None = None
        self._tokenizer = Tokenizer()
        self.stats: IndexStats | None = None

    @property
    def cache_file(self) -> Path:
        return self.cache_dir / CACHE_FILE_NAME

    def _cache_header(self) -> dict:
        # Everything a cached analysis depends on besides the blob's content.
        o = self.options
        return {
            "version": ANALYSIS_VERSION,
            "chunk_lines": o.chunk_lines,
            "binary_probe_bytes": o.binary_probe_bytes,
            "generated_probe_lines": o.generated_probe_lines,
        }

    # ------------------------------------------------------------ indexing

    def _candidates(self, repo_dir: Path, listed: list[ListedFile],
                    skipped: Counter[str]) -> list[ListedFile]:
        """The listed files that may be read, counting the others in `skipped`."""
        opts = self.options
        candidates: list[ListedFile] = []
        for item in listed:
            if item.mode == "160000":
                skipped["submodule"] += 1
                continue
            if item.mode == "120000":
                skipped["symlink"] += 1
                continue
            reason = path_skip_reason(item.path, opts)
            if reason is None:
                try:
                    if (repo_dir / item.path).stat().st_size > opts.max_file_bytes:
                        reason = "too_large"
                except OSError:
                    reason = "unreadable"
            if reason is None and item.blob is None and "\n" in item.path:
                reason = "unreadable"
            if reason:
                skipped[reason] += 1
                continue
            candidates.append(item)
        return candidates

    def update(self, repo_dir: Path) -> IndexStats:
        """Bring the index up to date with the working tree of `repo_dir`.

        Only files whose blob id the index does not have are read. Raises ContextError when
        `repo_dir` is not a git work tree.
        """
        began = time.perf_counter()
        repo_dir = Path(repo_dir)
        if self._corpus is None:
            self._corpus = store.load(self.cache_file, self._cache_header()) or Corpus()
        old = self._corpus
        listed = list_repository(repo_dir)
        skipped: Counter[str] = Counter()
        candidates = self._candidates(repo_dir, listed, skipped)
        hashes = hash_paths(repo_dir, [c.path for c in candidates if c.blob is None])
        known = set(old.keys)
        files: list[tuple[str, str]] = []
        fresh: dict[str, FileAnalysis] = {}
        skip_keys: dict[str, str] = {}
        read = 0
        for item in candidates:
            blob = item.blob or hashes[item.path]
            key = analysis_key(blob, item.path)
            reason = skip_keys.get(key) or old.skipped.get(key)
            if reason is None and key not in fresh and key not in known:
                try:
                    data = (repo_dir / item.path).read_bytes()
                except OSError:
                    skipped["unreadable"] += 1
                    continue
                read += 1
                analysis = analyse(data, item.path, self.options, self._tokenizer)
                if analysis.skip:
                    reason = analysis.skip
                else:
                    fresh[key] = analysis
            if reason:
                skip_keys[key] = reason
                skipped[reason] += 1
                continue
            files.append((item.path, blob))
        if files != list(zip(old.paths, old.blobs)) or skip_keys != old.skipped:
            self._corpus = store.assemble(old, files, fresh, skip_keys, self._tokenizer)
            store.save(self.cache_file, self._corpus, self._cache_header())
            for name in _EARLIER_CACHE_FILES:
                (self.cache_dir / name).unlink(missing_ok=True)
        self.stats = IndexStats(
            files_total=len(listed),
            files_indexed=len(files),
            files_read=read,
            files_skipped=dict(sorted(skipped.items())),
            seconds=time.perf_counter() - began,
        )
        return self.stats

    @property
    def files(self) -> list[IndexedFile]:
        """The indexed files, by path (empty before the first `update`)."""
        c = self._corpus
        if c is None:
            return []
        out = []
        for i, (path, blob) in enumerate(zip(c.paths, c.blobs)):
            lo, hi = int(c.doc_ptr[i]), int(c.doc_ptr[i + 1])
            chunks = tuple(Chunk(s, e, ()) for s, e in c.spans[lo:hi].tolist() if e)
            out.append(IndexedFile(path, blob, FileAnalysis(None, int(c.lines[i]),
                                                             c.symbols[i], chunks)))
        return out

    # ------------------------------------------------------------ ranking

    def rank(self, requirement: str, k: int = 10) -> list[ScoredFile]:
        """The `k` files most relevant to `requirement`, best first (ties by path).

        Only files with a positive score are returned. Call `update` first.
        """
        if self._corpus is None:
            raise ContextError("rank() before update(): the index is empty")
        return rank(self._corpus, requirement, k, self.weights, self._tokenizer)


def index_repository(
    repo_dir: Path, cache_dir: Path, options: IndexOptions | None = None
) -> RepoIndex:
    """Index `repo_dir` (reusing the index cached in `cache_dir`); see `RepoIndex`."""
    index = RepoIndex(cache_dir, options)
    index.update(repo_dir)
    return index


# ---------------------------------------------------------------- packing


@dataclass(frozen=True)
class ContextFile:
    """A file as it goes into the prompt; `truncated` when its tail was cut for the budget."""

    path: str
    text: str
    truncated: bool


def pack(
    repo_dir: Path,
    ranked: Iterable[ScoredFile],
    budget_tokens: int,
    count_tokens: Callable[[str], int],
    max_files: int,
    min_tokens: int = 200,
) -> list[ContextFile]:
    """Read ranked files best-first into at most `budget_tokens` tokens and `max_files` files.

    A file that fits whole goes in whole. The first that does not is cut at a line boundary
    and ends with the line `... (truncated)`, unless fewer than `min_tokens` tokens remain,
    in which case it is skipped (smaller files further down may still fit whole). Files that
    vanished or are binary are skipped. Tokens are counted on each file's text alone.
    """
    repo_dir = Path(repo_dir)
    out: list[ContextFile] = []
    remaining = budget_tokens
    for item in ranked:
        if len(out) >= max_files or remaining <= 0:
            break
        try:
            data = (repo_dir / item.path).read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192]:
            continue
        text = data.decode("utf-8", errors="replace")
        n = count_tokens(text)
        if n <= remaining:
            out.append(ContextFile(item.path, text, truncated=False))
            remaining -= n
            continue
        if remaining < min_tokens:
            continue
        cut = truncate_lines(text, remaining, count_tokens)
        if cut is None:
            continue
        out.append(ContextFile(item.path, cut, truncated=True))
        remaining -= count_tokens(cut)
    return out
