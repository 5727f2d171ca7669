"""Repository context for a requirement: index the files, rank them, pack the best into a budget.

Three steps, each a plain function or method with typed inputs:

1. `RepoIndex.update(repo_dir)` (or `index_repository`) lists the files git knows about
   (tracked, plus untracked files that are not ignored), drops what a model should never
   read (binaries, vendored trees, lock/minified/generated files, very large files) and
   analyses the rest: BM25 tokens per window of lines, and the top-level symbols a file
   defines. The analysis is cached on disk keyed by git blob id, so indexing again after a
   small change reads only the files whose content changed.
2. `RepoIndex.rank(requirement)` scores files: BM25 over the line windows ("chunks") of each
   file, normalised to [0, 1], plus boosts when the requirement names the file's path, its
   file name or stem, or a symbol it defines; test files paired with a ranked source file
   follow it closely.
3. `pack(...)` reads the ranked files best-first into a token budget, cutting the last one at
   a line boundary when it does not fit whole.

Nothing here holds module-level state; all work happens in functions and on `RepoIndex`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

# Bump when the analysis (tokenizer, stemmer, chunking, symbol extraction) changes: old
# cache files are then ignored instead of mixing two kinds of tokens.
ANALYSIS_VERSION = 2  # 2: chunk tokens live in ROWS_FILE_NAME as term ids and counts
CACHE_FILE_NAME = "context-index.json"
ROWS_FILE_NAME = "context-rows.npz"
TRUNCATION_MARKER = "... (truncated)"


class ContextError(RuntimeError):
    """The repository could not be listed (not a git work tree, git failed)."""


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class IndexOptions:
    """What the index skips and how it cuts files into chunks."""

    max_file_bytes: int = 500_000
    chunk_lines: int = 60
    binary_probe_bytes: int = 8192
    generated_probe_lines: int = 5
    vendored_dirs: frozenset[str] = frozenset(
        {
            "vendor",
            "vendored",
            "node_modules",
            "bower_components",
            "third_party",
            "site-packages",
            "dist-packages",
            ".venv",
        }
    )
    lock_names: frozenset[str] = frozenset(
        {"package-lock.json", "npm-shrinkwrap.json", "pnpm-lock.yaml", "go.sum"}
    )
    generated_suffixes: tuple[str, ...] = (".lock", ".min.js", ".min.css", ".js.map", ".css.map")


@dataclass(frozen=True)
class Chunk:
    """A window of lines of one file and its BM25 tokens (lines are 1-based, inclusive)."""

    start_line: int
    end_line: int
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class FileAnalysis:
    """What the index keeps for one blob; `skip` is set when the content rules it out."""

    skip: str | None = None  # "binary" | "generated" | None
    lines: int = 0
    symbols: tuple[str, ...] = ()
    chunks: tuple[Chunk, ...] = ()


@dataclass(frozen=True)
class IndexedFile:
    """A file in the index: its repository-relative path, git blob id and analysis."""

    path: str
    blob: str
    analysis: FileAnalysis


@dataclass
class IndexStats:
    """What one `update` did. `files_read` counts files read and analysed this time."""

    files_total: int
    files_indexed: int
    files_read: int
    files_skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0


@dataclass
class ScoredFile:
    """A ranked file: a score (BM25 normalised to 1.0 plus boosts) and why it ranked."""

    path: str
    score: float
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ContextFile:
    """A file as it goes into the prompt; `truncated` when its tail was cut for the budget."""

    path: str
    text: str
    truncated: bool


@dataclass(frozen=True)
class RankWeights:
    """How much each signal adds to the normalised BM25 score (the best file scores 1.0)."""

    path_mentioned: float = 2.0  # the full path, or a path suffix with a directory
    name_mentioned: float = 1.0  # the file name with extension, e.g. "context.py"
    stem_mentioned: float = 0.4  # the file name without extension, as a word (x rarity)
    symbol_mentioned: float = 1.0  # an identifier-like mention of a symbol the file defines
    symbol_word: float = 0.4  # a capitalised plain word equal to a class name (x rarity)
    symbol_cap: float = 1.5  # most the symbol boosts add to one file
    extra_chunks: float = 0.1  # share of the other chunks' scores added to the best chunk
    extra_chunks_cap: float = 0.3  # ... at most this fraction of the best chunk's score
    paired_test: float = 0.9  # a paired test file scores this fraction of its source
    paired_sources: int = 30  # how many top source files pull their tests up
    tests_per_source: int = 1  # ... and how many tests each (the best-matching first)


# ---------------------------------------------------------------- tokens

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CAMEL_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
_STOPWORDS = frozenset(
    """a an and are as at be but by for from has have he her his i if in into is it its me my
    no not of on or our she so such than that the their them then there these they this
    those to was we were what when where which while who will with you your can could
    should would do does did done been being also only just any all some each other more
    most very own same too how why here self none true false def return import""".split()  # noqa: SIM905
)


def _stem(word: str) -> str:
    """A light suffix stemmer: 'parsing', 'parsed', 'parses' and 'parse' all give 'pars'."""
    n = len(word)
    if n > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if n > 5 and word.endswith("ing"):
        word = word[:-3]
    elif n > 4 and (
        (word.endswith("ed") and not word.endswith("eed"))
        or (word.endswith("es") and word[-3] in "sxz")
    ):
        word = word[:-2]
    elif n > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
        word = word[:-1]  # running -> runn -> run
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


class Tokenizer:
    """Splits text into BM25 tokens: identifiers split on snake_case and camelCase,
    lowercased, stemmed, stopwords and one-letter pieces dropped; a multi-part identifier
    also yields its joined form ("parse_header" and "parseHeader" both give "parseheader").

    Keeps a memo of identifiers seen, so make one per indexing run, not one per file.
    """

    def __init__(self) -> None:
        self._memo: dict[str, tuple[str, ...]] = {}

    def identifier(self, ident: str) -> tuple[str, ...]:
        """Tokens of one identifier."""
        found = self._memo.get(ident)
        if found is not None:
            return found
        parts = [p.lower() for piece in ident.split("_") for p in _CAMEL_RE.findall(piece)]
        out = [_stem(p) for p in parts if len(p) > 1 and p not in _STOPWORDS]
        if len(parts) > 1:
            joined = "".join(parts)
            if 3 < len(joined) <= 40:
                out.append(joined)
        result = tuple(out)
        if len(self._memo) < 500_000:
            self._memo[ident] = result
        return result

    def __call__(self, text: str) -> list[str]:
        out: list[str] = []
        for ident in _IDENT_RE.findall(text):
            out.extend(self.identifier(ident))
        return out


# ---------------------------------------------------------------- symbols

_SYMBOL_RE = re.compile(
    r"^[ \t]{0,4}(?:(?:export|default|public|private|protected|internal|static|final|abstract"
    r"|async|pub(?:\([^)]*\))?|unsafe|extern|inline|virtual|override|sealed|partial|open|data)"
    r"\s+)*(?:def|class|function\*?|func|fn|struct|enum|trait|interface|type|module|object"
    r"|record|protocol)\s+(?:\([^)]*\)\s*)?([A-Za-z_$][\w$]*)",
    re.MULTILINE,
)
_JS_CONST_FN_RE = re.compile(
    r"^(?:export\s+)?(?:const|let|var)\s+([A-Za-z_$][\w$]*)\s*=\s*(?:async\s*)?(?:function\b|\([^)]*\)\s*=>|[A-Za-z_$][\w$]*\s*=>)",
    re.MULTILINE,
)
_SHELL_FN_RE = re.compile(r"^(?:function\s+)?([A-Za-z_][\w-]*)\s*\(\)\s*\{", re.MULTILINE)


def _python_symbols(text: str) -> tuple[str, ...] | None:
    """Top-level functions and classes, and the methods of top-level classes; None when
    the text does not parse as Python."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    names: list[str] = []
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    for node in tree.body:
        if isinstance(node, defs):
            names.append(node.name)
            if isinstance(node, ast.ClassDef):
                names.extend(
                    sub.name
                    for sub in node.body
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and not sub.name.startswith("__")
                )
    return tuple(dict.fromkeys(names))


def _regex_symbols(text: str) -> tuple[str, ...]:
    names = [m.group(1) for m in _SYMBOL_RE.finditer(text)]
    names += [m.group(1) for m in _JS_CONST_FN_RE.finditer(text)]
    names += [m.group(1) for m in _SHELL_FN_RE.finditer(text)]
    return tuple(dict.fromkeys(names))


def extract_symbols(text: str, path: str) -> tuple[str, ...]:
    """Names a file defines: Python through `ast`, other languages (and Python that does not
    parse) through a line-anchored regex for def/class/function/fn/struct/... forms."""
    if path.endswith((".py", ".pyi")):
        found = _python_symbols(text)
        if found is not None:
            return found
    return _regex_symbols(text)


# ---------------------------------------------------------------- analysis

_GENERATED_RE = re.compile(
    r"do not edit|@generated|auto-?generated|generated by|code generated|this file (?:is|was) generated",
    re.IGNORECASE,
)


def _analysis_key(blob: str, path: str) -> str:
    # Symbols depend on the language as well as the content.
    return blob + (".py" if path.endswith((".py", ".pyi")) else "")


def path_skip_reason(path: str, options: IndexOptions) -> str | None:
    """Why a path is left out by its name alone, or None."""
    parts = path.split("/")
    if any(part in options.vendored_dirs for part in parts[:-1]):
        return "vendored"
    name = parts[-1]
    if name in options.lock_names or name.endswith(options.generated_suffixes):
        return "generated"
    return None


def analyse(data: bytes, path: str, options: IndexOptions, tokenizer: Tokenizer) -> FileAnalysis:
    """Analyse one file's bytes: skip reasons that depend on content, chunks and symbols."""
    if b"\0" in data[: options.binary_probe_bytes]:
        return FileAnalysis(skip="binary")
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if _GENERATED_RE.search("\n".join(lines[: options.generated_probe_lines])):
        return FileAnalysis(skip="generated")
    size = options.chunk_lines
    starts = list(range(0, len(lines), size))
    # A short tail joins the chunk before it rather than standing alone.
    if len(starts) > 1 and len(lines) - starts[-1] < size // 3:
        starts.pop()
    chunks = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        tokens = tokenizer("\n".join(lines[start:end]))
        chunks.append(Chunk(start + 1, end, tuple(tokens)))
    return FileAnalysis(
        skip=None, lines=len(lines), symbols=extract_symbols(text, path), chunks=tuple(chunks)
    )


def _encode(a: FileAnalysis) -> dict:
    if a.skip:
        return {"skip": a.skip}
    return {
        "lines": a.lines,
        "symbols": list(a.symbols),
        "chunks": [[c.start_line, c.end_line] for c in a.chunks],
    }


def _decode(d: dict) -> FileAnalysis:
    if d.get("skip"):
        return FileAnalysis(skip=str(d["skip"]))
    return FileAnalysis(
        skip=None,
        lines=int(d["lines"]),
        symbols=tuple(d["symbols"]),
        chunks=tuple(Chunk(int(c[0]), int(c[1]), ()) for c in d["chunks"]),
    )


# ---------------------------------------------------------------- git listing


def _git(repo_dir: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        ["git", "-C", str(repo_dir), *args], capture_output=True, input=stdin, check=False
    )
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise ContextError(f"git {' '.join(args[:2])} in {repo_dir}: {err}")
    return proc.stdout


def _split_z(out: bytes) -> list[str]:
    return [p.decode("utf-8", "surrogateescape") for p in out.split(b"\0") if p]


@dataclass(frozen=True)
class ListedFile:
    path: str
    mode: str  # git mode, "100644" for untracked regular files
    blob: str | None  # None: hash the working-tree file


def list_repository(repo_dir: Path) -> list[ListedFile]:
    """Tracked files with their blob ids (files changed in the working tree get no id, so
    they are hashed again), and untracked files that .gitignore does not exclude."""
    staged: dict[str, ListedFile] = {}
    for entry in _split_z(_git(repo_dir, "ls-files", "-s", "-z")):
        meta, _, path = entry.partition("\t")
        mode, blob, stage = meta.split(" ")
        if stage != "0":  # a merge conflict: what counts is the working-tree file
            blob = None
        staged[path] = ListedFile(path, mode, blob)
    deleted = set(_split_z(_git(repo_dir, "ls-files", "-d", "-z")))
    modified = set(_split_z(_git(repo_dir, "ls-files", "-m", "-z")))
    listed = []
    for path, item in staged.items():
        if path in deleted:
            continue
        if path in modified and item.mode != "160000":
            item = ListedFile(path, item.mode, None)
        listed.append(item)
    for path in _split_z(_git(repo_dir, "ls-files", "-o", "--exclude-standard", "-z")):
        if path.endswith("/"):  # a nested repository
            listed.append(ListedFile(path.rstrip("/"), "160000", None))
            continue
        full = repo_dir / path
        mode = "120000" if full.is_symlink() else "100644"
        listed.append(ListedFile(path, mode, None))
    listed.sort(key=lambda item: item.path)
    return listed


def _hash_paths(repo_dir: Path, paths: Sequence[str]) -> dict[str, str]:
    if not paths:
        return {}
    stdin = "".join(p + "\n" for p in paths).encode("utf-8", "surrogateescape")
    ids = _git(repo_dir, "hash-object", "--stdin-paths", stdin=stdin).decode().split()
    return dict(zip(paths, ids, strict=True))


# ---------------------------------------------------------------- the ranking corpus


@dataclass
class _Corpus:
    """Everything `rank` needs, built once per `update`."""

    files: list[IndexedFile]
    retriever: _BM25 | None
    chunk_starts: np.ndarray  # index of each file's first chunk document
    chunk_spans: list[tuple[int, int]]  # (start_line, end_line) per chunk document
    by_path: dict[str, int]
    by_name: dict[str, list[int]]  # lowercased file name -> files
    by_stem: dict[str, list[int]]  # lowercased stem -> files
    by_symbol: dict[str, list[int]]  # symbol (exact case) -> files defining it
    tests_for: dict[int, list[int]]  # source file -> paired test files
    is_test: np.ndarray  # bool per file


_GENERIC_STEMS = frozenset(
    {"__init__", "__main__", "index", "main", "setup", "conftest", "mod", "lib", "init", "readme"}
)


def is_test_path(path: str) -> bool:
    """Whether a path looks like a test file (test_x.py, x_test.go, x.test.ts, tests/...)."""
    p = PurePosixPath(path)
    name = p.name
    stem = name.split(".")[0]
    return (
        stem.startswith("test_")
        or stem.endswith(("_test", "_spec"))
        or ".test." in name
        or ".spec." in name
        or any(part in ("tests", "test", "__tests__", "spec") for part in p.parts[:-1])
    )


def _source_stem_of_test(path: str) -> str | None:
    stem = PurePosixPath(path).name.split(".")[0]
    if stem.startswith("test_"):
        return stem[5:]
    for suffix in ("_test", "_spec"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    name = PurePosixPath(path).name
    if ".test." in name or ".spec." in name:
        return stem
    return None


def _pair_tests(
    files: list[IndexedFile], by_stem: dict[str, list[int]], is_test: np.ndarray
) -> dict[int, list[int]]:
    """Pair each test file (test_x.py, x_test.go, x.test.ts) with the source files of stem x
    and the same extension that share the most directory names with it
    (tests/orm/test_session.py goes with lib/orm/session.py rather than lib/ext/session.py)."""
    tests_for: dict[int, list[int]] = {}
    for t, f in enumerate(files):
        src_stem = _source_stem_of_test(f.path)
        if not src_stem:
            continue
        suffix = PurePosixPath(f.path).suffix
        sources = [
            s
            for s in by_stem.get(src_stem.lower(), [])
            if not is_test[s] and PurePosixPath(files[s].path).suffix == suffix
        ]
        if not sources:
            continue
        test_dirs = set(PurePosixPath(f.path).parts[:-1])
        overlap = {
            s: len(test_dirs & set(PurePosixPath(files[s].path).parts[:-1])) for s in sources
        }
        best = max(overlap.values())
        for s in sources:
            if overlap[s] == best:
                tests_for.setdefault(s, []).append(t)
    return tests_for


class _Terms:
    """Term ids, and each analysed blob's chunks as (term id, count) rows, kept on disk.

    A fresh process loads these arrays instead of tokenising and counting every chunk
    again, so re-indexing costs what changed, not the size of the repository."""

    def __init__(self) -> None:
        self.vocab: list[str] = []
        self.ids: dict[str, int] = {}
        # key -> (term ids, counts, entries per chunk): a blob's chunks, one after another
        self.rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def id(self, token: str) -> int:
        i = self.ids.get(token)
        if i is None:
            i = self.ids[token] = len(self.vocab)
            self.vocab.append(token)
        return i

    def count(self, tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        c = Counter(self.id(t) for t in tokens)
        return (np.fromiter(c.keys(), dtype=np.int32, count=len(c)),
                np.fromiter(c.values(), dtype=np.int32, count=len(c)))

    def add(self, key: str, analysis: FileAnalysis) -> None:
        rows = [self.count(c.tokens) for c in analysis.chunks]
        empty = np.zeros(0, dtype=np.int32)
        self.rows[key] = (
            np.concatenate([r[0] for r in rows]) if rows else empty,
            np.concatenate([r[1] for r in rows]) if rows else empty,
            np.array([len(r[0]) for r in rows], dtype=np.int64),
        )

    def save(self, path: Path, keys: Iterable[str]) -> None:
        keys = [k for k in keys if k in self.rows]
        rows = [self.rows[k] for k in keys]
        key_docs = np.cumsum([0] + [len(r[2]) for r in rows], dtype=np.int64)
        lengths = np.concatenate([r[2] for r in rows]) if rows else np.zeros(0, dtype=np.int64)
        doc_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        empty = np.zeros(0, dtype=np.int32)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".rows-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh, version=np.array([ANALYSIS_VERSION]),
                    vocab=np.array(self.vocab, dtype=str), keys=np.array(keys, dtype=str),
                    key_docs=key_docs, doc_ptr=doc_ptr,
                    ids=np.concatenate([r[0] for r in rows]) if rows else empty,
                    counts=np.concatenate([r[1] for r in rows]) if rows else empty,
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> _Terms:
        terms = cls()
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"][0]) != ANALYSIS_VERSION:
                    return terms
                vocab, keys = z["vocab"].tolist(), z["keys"].tolist()
                key_docs, doc_ptr = z["key_docs"], z["doc_ptr"]
                ids, counts = z["ids"], z["counts"]
        except (OSError, ValueError, KeyError):
            return terms
        terms.vocab = vocab
        terms.ids = {t: i for i, t in enumerate(vocab)}
        lengths = np.diff(doc_ptr)
        for k, key in enumerate(keys):
            a, b = int(key_docs[k]), int(key_docs[k + 1])
            lo, hi = int(doc_ptr[a]), int(doc_ptr[b])
            terms.rows[key] = (ids[lo:hi], counts[lo:hi], lengths[a:b])
        return terms


class _BM25:
    """BM25 (Lucene's variant, k1 1.5, b 0.75) over (doc, term, count) entries with no
    duplicates, scores precomputed per entry. Built in linear time (no sort), so a fresh
    process pays little for it; a query sums the entries of its few terms."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_docs: int,
                 vocab: dict[str, int], k1: float = 1.5, b: float = 0.75):
        self.vocab = vocab
        self.n_docs = n_docs
        tf = vals.astype(np.float64)
        dl = np.bincount(rows, weights=tf, minlength=n_docs)
        avg = float(dl.mean()) if n_docs and dl.sum() else 1.0
        df = np.bincount(cols, minlength=len(vocab)).astype(np.float64)
        idf = np.log(1 + (n_docs - df + 0.5) / (df + 0.5))
        self.scores = idf[cols] * tf / (k1 * ((1 - b) + b * dl[rows] / avg) + tf)
        self.rows = rows
        self.cols = cols

    def get_tokens_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.vocab[t] for t in tokens if t in self.vocab]

    def get_scores_from_ids(self, ids: Sequence[int]) -> np.ndarray:
        out = np.zeros(self.n_docs, dtype=np.float64)
        if len(ids):
            wanted = np.zeros(len(self.vocab) + 1, dtype=bool)
            wanted[np.asarray(list(ids), dtype=np.int64)] = True
            hit = wanted[self.cols]
            out += np.bincount(self.rows[hit], weights=self.scores[hit], minlength=self.n_docs)
        return out


def _build_corpus(files: list[IndexedFile], tokenizer: Tokenizer, terms: _Terms) -> _Corpus:
    starts: list[int] = []
    spans: list[tuple[int, int]] = []
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    by_symbol: dict[str, list[int]] = {}
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    n_docs = 0
    for i, f in enumerate(files):
        p = PurePosixPath(f.path)
        by_name.setdefault(p.name.lower(), []).append(i)
        by_stem.setdefault(p.stem.lower(), []).append(i)
        for sym in f.analysis.symbols:
            if len(sym) < 3 or sym.startswith("__"):
                continue
            by_symbol.setdefault(sym, []).append(i)
        # The path's words count in every chunk: "settings" finds settings.py anywhere in it.
        path_ids, path_counts = terms.count(tokenizer(f.path.replace(".", " ")))
        starts.append(n_docs)
        f_cols, f_vals, lengths = terms.rows[_analysis_key(f.blob, f.path)]
        if not f.analysis.chunks:
            lengths = np.zeros(1, dtype=np.int64)
            spans.append((0, 0))
        else:
            spans.extend((c.start_line, c.end_line) for c in f.analysis.chunks)
        k = len(lengths)
        f_rows = np.repeat(np.arange(n_docs, n_docs + k, dtype=np.int64), lengths)
        f_vals = f_vals.copy()
        extra_rows, extra_cols, extra_vals = [], [], []
        for pid, pcount in zip(path_ids.tolist(), path_counts.tolist()):
            m = f_cols == pid  # chunks that have the word already: count it once more
            f_vals[m] += pcount
            has = np.zeros(k, dtype=bool)
            has[f_rows[m] - n_docs] = True
            missing = np.flatnonzero(~has) + n_docs
            extra_rows.append(missing)
            extra_cols.append(np.full(len(missing), pid, dtype=np.int32))
            extra_vals.append(np.full(len(missing), pcount, dtype=np.int32))
        rows.extend([f_rows, *extra_rows])
        cols.extend([f_cols, *extra_cols])
        vals.extend([f_vals, *extra_vals])
        n_docs += k
    is_test = np.array([is_test_path(f.path) for f in files], dtype=bool)
    tests_for = _pair_tests(files, by_stem, is_test)
    retriever = None
    if n_docs and sum(len(c) for c in cols):
        retriever = _BM25(np.concatenate(rows), np.concatenate(cols).astype(np.int32),
                          np.concatenate(vals), n_docs, terms.ids)
    return _Corpus(
        files=files,
        retriever=retriever,
        chunk_starts=np.array(starts, dtype=np.int64),
        chunk_spans=spans,
        by_path={f.path: i for i, f in enumerate(files)},
        by_name=by_name,
        by_stem=by_stem,
        by_symbol=by_symbol,
        tests_for=tests_for,
        is_test=is_test,
    )


# ---------------------------------------------------------------- requirement mentions

_PATHLIKE_RE = re.compile(r"[\w.\-/]*[\w\-]\.[A-Za-z0-9]+|[\w.\-]+(?:/[\w.\-]+)+")
_BACKTICK_RE = re.compile(r"`([^`\n]+)`")
_CALL_RE = re.compile(r"([A-Za-z_][\w.]*)\(")
_DOTTED_NAME_RE = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*(?:\(\))?")


@dataclass
class _Mentions:
    pathlike: set[str]  # tokens that look like paths or file names
    words: set[str]  # every identifier-ish word, lowercased
    identifiers: set[str]  # identifier-like words (snake, camel, dotted, backticked, called)
    # as written: symbols match case-sensitively, so `misc` does not find class Misc
    capitalised: set[str]  # plain words starting with a capital letter (exact case)


def _mentions(requirement: str) -> _Mentions:
    pathlike = {m.group(0).strip("./") for m in _PATHLIKE_RE.finditer(requirement)}
    pathlike.discard("")
    words = set()
    identifiers = set()
    capitalised = set()
    for m in _IDENT_RE.finditer(requirement):
        w = m.group(0)
        words.add(w.lower())
        inner = w.strip("_")
        if "_" in inner or re.search(r"[a-z][A-Z]", inner):
            identifiers.add(w)
        elif w[0].isupper() and len(w) > 3:
            capitalised.add(w)
    # A backticked name (`parse`, ``Session.merge()``) or a call (parse(...)) marks even a
    # plain word as code; words inside a longer backticked expression (`mode=memory`) do not.
    for m in _BACKTICK_RE.finditer(requirement):
        code = m.group(1).strip()
        if _DOTTED_NAME_RE.fullmatch(code):
            identifiers.update(_IDENT_RE.findall(code))
    for m in _CALL_RE.finditer(requirement):
        for w in m.group(1).split("."):
            if w:
                identifiers.add(w)
    for p in pathlike:  # "Foo.bar" written as a dotted name
        if "/" not in p:
            for w in p.split("."):
                if "_" in w.strip("_") or re.search(r"[a-z][A-Z]", w):
                    identifiers.add(w)
    return _Mentions(pathlike, words, identifiers, capitalised)


def _add(boosts: dict[int, list[tuple[float, str]]], i: int, value: float, reason: str) -> None:
    boosts.setdefault(i, []).append((value, reason))


def _rarity(corpus: _Corpus, tokenizer: Tokenizer, word: str) -> float:
    """How rare a word is across the files, from 0 (in every file) to 1 (in one file): a
    normalised inverse document frequency. A file named after a rare word ("mssqlpython")
    is a stronger hint than one named after a common one ("session", "performance")."""
    tokens = tokenizer.identifier(word)
    n = len(corpus.files)
    if not tokens or corpus.retriever is None or n < 2:
        return 1.0
    ids = corpus.retriever.get_tokens_ids([tokens[-1]])
    if not ids:
        return 1.0
    present = corpus.retriever.get_scores_from_ids(ids) > 0
    df = int(np.count_nonzero(np.maximum.reduceat(present.astype(np.int8), corpus.chunk_starts)))
    return float(min(1.0, max(0.0, np.log((n + 1) / (df + 0.5)) / np.log(n + 1))))


def _mention_boosts(
    corpus: _Corpus, mentions: _Mentions, w: RankWeights, tokenizer: Tokenizer
) -> dict[int, list[tuple[float, str]]]:
    boosts: dict[int, list[tuple[float, str]]] = {}
    path_hit: set[int] = set()
    for token in sorted(mentions.pathlike):
        if "/" in token:
            exact = corpus.by_path.get(token)
            hits = (
                [exact]
                if exact is not None
                else [i for p, i in corpus.by_path.items() if p.endswith("/" + token)]
            )
            for i in hits:
                _add(boosts, i, w.path_mentioned / len(hits), f"path mentioned: {token}")
                path_hit.add(i)
        else:
            hits = corpus.by_name.get(token.lower(), [])
            exact = [i for i in hits if PurePosixPath(corpus.files[i].path).name == token]
            hits = exact or hits
            for i in hits:
                if i not in path_hit:
                    _add(boosts, i, w.name_mentioned / len(hits), f"file name mentioned: {token}")
                    path_hit.add(i)
    for word in sorted(mentions.words):
        if word in _GENERIC_STEMS or len(word) < 3:
            continue
        hits = [i for i in corpus.by_stem.get(word, []) if i not in path_hit]
        if hits:
            value = w.stem_mentioned * _rarity(corpus, tokenizer, word) / len(hits)
            for i in hits:
                _add(boosts, i, value, f"file stem mentioned: {word}")
    symbol_boost: dict[int, float] = {}
    symbol_reasons: dict[int, list[str]] = {}
    for ident in sorted(mentions.identifiers):
        hits = corpus.by_symbol.get(ident, [])
        for i in hits:
            symbol_boost[i] = symbol_boost.get(i, 0.0) + w.symbol_mentioned / len(hits)
            symbol_reasons.setdefault(i, []).append(ident)
    for word in sorted(mentions.capitalised):
        if word in mentions.identifiers:
            continue
        hits = corpus.by_symbol.get(word, [])
        if hits:
            value = w.symbol_word * _rarity(corpus, tokenizer, word) / len(hits)
            for i in hits:
                symbol_boost[i] = symbol_boost.get(i, 0.0) + value
                symbol_reasons.setdefault(i, []).append(word)
    for i, value in symbol_boost.items():
        names = ", ".join(symbol_reasons[i][:3])
        _add(boosts, i, min(value, w.symbol_cap), f"defines {names}")
    return boosts


# ---------------------------------------------------------------- the index


class RepoIndex:
    """The index of one repository, cached on disk in `cache_dir`.

    `cache_dir` belongs to one repository (its workspaces may come and go: the cache is
    keyed by blob id, not by path). It holds one JSON file, replaced atomically, mapping
    blob ids to analyses; blobs no longer in the tree are dropped when it is written.
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
        self._analyses: dict[str, FileAnalysis] | None = None
        self._terms: _Terms | None = None
        self._corpus: _Corpus | None = None
        self._tokenizer = Tokenizer()
        self.stats: IndexStats | None = None

    # ------------------------------------------------------------ cache

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

    def _load_cache(self) -> dict[str, FileAnalysis]:
        try:
            with open(self.cache_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("header") != self._cache_header():
            return {}
        try:
            return {key: _decode(value) for key, value in data["blobs"].items()}
        except (KeyError, TypeError, ValueError):
            return {}

    def _save_cache(self, analyses: dict[str, FileAnalysis]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "header": self._cache_header(),
            "blobs": {key: _encode(a) for key, a in sorted(analyses.items())},
        }
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".context-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(payload, fh, separators=(",", ":"))
            os.replace(tmp, self.cache_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ indexing

    def update(self, repo_dir: Path) -> IndexStats:
        """Bring the index up to date with the working tree of `repo_dir`.

        Only files whose blob id is not in the cache are read. Raises ContextError when
        `repo_dir` is not a git work tree.
        """
        began = time.perf_counter()
        repo_dir = Path(repo_dir)
        opts = self.options
        if self._analyses is None:
            self._terms = _Terms.load(self.cache_dir / ROWS_FILE_NAME)
            # An analysis counts as cached only with its term rows next to it.
            self._analyses = {k: a for k, a in self._load_cache().items()
                              if a.skip or k in self._terms.rows}
        cached = self._analyses
        terms = self._terms
        assert terms is not None
        listed = list_repository(repo_dir)
        skipped: Counter[str] = Counter()
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
        hashes = _hash_paths(repo_dir, [c.path for c in candidates if c.blob is None])
        files: list[IndexedFile] = []
        keep: dict[str, FileAnalysis] = {}
        read = 0
        for item in candidates:
            blob = item.blob or hashes[item.path]
            key = _analysis_key(blob, item.path)
            analysis = keep.get(key) or cached.get(key)
            if analysis is None:
                try:
                    data = (repo_dir / item.path).read_bytes()
                except OSError:
                    skipped["unreadable"] += 1
                    continue
                read += 1
                analysis = analyse(data, item.path, opts, self._tokenizer)
                if not analysis.skip:
                    terms.add(key, analysis)
                    # The tokens now live in the term rows; the analysis keeps the spans.
                    analysis = FileAnalysis(None, analysis.lines, analysis.symbols, tuple(
                        Chunk(c.start_line, c.end_line, ()) for c in analysis.chunks))
            keep[key] = analysis
            if analysis.skip:
                skipped[analysis.skip] += 1
                continue
            files.append(IndexedFile(item.path, blob, analysis))
        same = self._corpus is not None and [(f.path, f.blob) for f in self._corpus.files] == [
            (f.path, f.blob) for f in files
        ]
        words = len(terms.vocab)
        if not same:
            self._corpus = _build_corpus(files, self._tokenizer, terms)
        if read or keep.keys() != cached.keys() or len(terms.vocab) != words:
            self._save_cache(keep)
            terms.rows = {k: terms.rows[k] for k in keep if k in terms.rows}
            terms.save(self.cache_dir / ROWS_FILE_NAME, keep)
        self._analyses = keep
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
        return list(self._corpus.files) if self._corpus else []

    # ------------------------------------------------------------ ranking

    def rank(self, requirement: str, k: int = 10) -> list[ScoredFile]:
        """The `k` files most relevant to `requirement`, best first (ties by path).

        Only files with a positive score are returned. Call `update` first.
        """
        corpus = self._corpus
        if corpus is None:
            raise ContextError("rank() before update(): the index is empty")
        n = len(corpus.files)
        if n == 0 or k <= 0:
            return []
        w = self.weights
        reasons: dict[int, list[str]] = {}
        # BM25 per chunk; per file the best chunk plus a little for other matching chunks,
        # normalised so the best file scores 1.0 and the boosts below mean the same in
        # every repository.
        text = np.zeros(n, dtype=np.float64)
        chunk_scores = np.zeros(0, dtype=np.float64)
        query = list(dict.fromkeys(self._tokenizer(requirement)))
        ids = corpus.retriever.get_tokens_ids(query) if corpus.retriever is not None else []
        if ids:
            chunk_scores = np.asarray(corpus.retriever.get_scores_from_ids(ids), dtype=np.float64)
            best = np.maximum.reduceat(chunk_scores, corpus.chunk_starts)
            total = np.add.reduceat(chunk_scores, corpus.chunk_starts)
            extra = np.minimum(w.extra_chunks * (total - best), w.extra_chunks_cap * best)
            raw = best + extra
            if raw.max() > 0:
                text = raw / raw.max()
        scores = text.copy()

        for i, items in _mention_boosts(corpus, _mentions(requirement), w, self._tokenizer).items():
            for value, why in items:
                scores[i] += value
                reasons.setdefault(i, []).append(f"{why} (+{value:.2f})")

        # Tests follow their source file: score slightly below it unless they beat it.
        order = sorted(np.flatnonzero(scores > 0), key=lambda i: (-scores[i], corpus.files[i].path))
        sources = [i for i in order if not corpus.is_test[i]][: w.paired_sources]
        for s in sources:
            paired = corpus.tests_for.get(int(s), [])
            paired = sorted(paired, key=lambda t: (-scores[t], corpus.files[t].path))
            for t in paired[: w.tests_per_source]:
                target = scores[s] * w.paired_test
                if target > scores[t]:
                    scores[t] = target
                    reasons.setdefault(t, []).append(f"test for {corpus.files[s].path}")

        ranked = sorted(
            (int(i) for i in np.flatnonzero(scores > 0)),
            key=lambda i: (-round(float(scores[i]), 6), corpus.files[i].path),
        )[:k]
        out = []
        for i in ranked:
            why = _text_reason(corpus, chunk_scores, i, float(text[i])) + reasons.get(i, [])
            out.append(ScoredFile(corpus.files[i].path, round(float(scores[i]), 6), why))
        return out


def _text_reason(corpus: _Corpus, chunk_scores: np.ndarray, i: int, score: float) -> list[str]:
    """Where file `i` matched the requirement's words: its best window, how many matched."""
    if score <= 0:
        return []
    start = int(corpus.chunk_starts[i])
    end = int(corpus.chunk_starts[i + 1]) if i + 1 < len(corpus.chunk_starts) else len(chunk_scores)
    local = chunk_scores[start:end]
    lo, hi = corpus.chunk_spans[start + int(np.argmax(local))]
    matching = int(np.count_nonzero(local > 0))
    where = f"lines {lo}-{hi}" if hi else "path"
    more = f", {matching} matching chunks" if matching > 1 else ""
    return [f"text match {score:.2f} ({where}{more})"]


def index_repository(
    repo_dir: Path, cache_dir: Path, options: IndexOptions | None = None
) -> RepoIndex:
    """Index `repo_dir` (reusing the analyses cached in `cache_dir`); see `RepoIndex`."""
    index = RepoIndex(cache_dir, options)
    index.update(repo_dir)
    return index


# ---------------------------------------------------------------- packing


def _truncate(text: str, budget: int, count_tokens: Callable[[str], int]) -> str | None:
    """The longest line prefix of `text` that, with the marker line, fits `budget` tokens."""
    lines = text.splitlines(keepends=True)

    def cut(n: int) -> str:
        head = "".join(lines[:n])
        if head and not head.endswith("\n"):
            head += "\n"
        return head + TRUNCATION_MARKER + "\n"

    # Gallop to the first prefix that does not fit, then bisect: the strings counted stay
    # near the budget's size even when the file is much larger.
    lo, hi = 0, 1  # cut(lo) fits (or lo == 0); look for the last n in [lo, hi] that fits
    while hi <= len(lines) and count_tokens(cut(hi)) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi - 1, len(lines))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(cut(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return cut(lo) if lo > 0 else None


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
        cut = _truncate(text, remaining, count_tokens)
        if cut is None:
            continue
        out.append(ContextFile(item.path, cut, truncated=True))
        remaining -= count_tokens(cut)
    return out
