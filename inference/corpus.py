"""The assembled ranking index of one repository, and the file that keeps it between processes.

A `Corpus` holds, for the indexed files in path order, their line windows ("documents") and a
BM25 term-document matrix over them, stored by term (CSC: each term's documents and counts
side by side, so a query reads only its own terms' entries). The words of a file's path count
in every one of its documents.

`assemble` builds a corpus from the previous one: files whose path and blob are unchanged
keep their entries as they are (renumbered with numpy, never re-tokenised), a blob the
previous corpus held under another path reuses its counts, and only files analysed now are
counted in Python. The vocabulary stays sorted and holds exactly the terms in use, so the
corpus a patch gives is the corpus a full build gives. `save`/`load` keep it in one binary
file (a JSON header and raw arrays), read back with no parsing per file.
"""

from __future__ import annotations

import json
import os
import tempfile
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np

from inference.index import FileAnalysis, analysis_key
from inference.paths import is_test_path, source_stem_of_test

K1 = 1.5  # BM25 (Lucene's variant)
B = 0.75
_MAGIC = b"codeloop-corpus\n"

_I64 = np.int64
_I32 = np.int32


def _empty(dtype=_I64, shape=(0,)) -> np.ndarray:
    return np.zeros(shape, dtype=dtype)


class Lookup:
    """A read-only map from strings to ascending file indices, kept as sorted arrays so a
    fresh process reads it without building a dict (`get` bisects)."""

    def __init__(self, keys: list[str], ptr: np.ndarray, files: np.ndarray) -> None:
        self.keys, self.ptr, self.files = keys, ptr, files

    @classmethod
    def build(cls, pairs: Iterable[tuple[str, int]]) -> Lookup:
        """From (key, file) pairs."""
        ordered = sorted(pairs)  # by key, then file
        every = [key for key, _ in ordered]
        keys = list(dict.fromkeys(every))
        counts = Counter(every)
        ptr = np.concatenate([[0], np.cumsum([counts[k] for k in keys], dtype=_I64)])
        return cls(keys, ptr.astype(_I64), np.array([i for _, i in ordered], dtype=_I64))

    def get(self, key: str, default: list[int] | None = None) -> list[int]:
        j = bisect_left(self.keys, key)
        if j < len(self.keys) and self.keys[j] == key:
            return self.files[int(self.ptr[j]):int(self.ptr[j + 1])].tolist()
        return default if default is not None else []


def _empty_lookup() -> Lookup:
    return Lookup([], np.zeros(1, dtype=_I64), _empty())


@dataclass(eq=False)
class Corpus:
    """Everything `rank` reads. Files are in path order; file i's documents are
    `doc_ptr[i]:doc_ptr[i + 1]` (a file with no lines has one empty document, span (0, 0));
    term t's entries are `term_ptr[t]:term_ptr[t + 1]` of `term_docs` / `term_tf`, by
    document. `skipped` maps blob keys ruled out by their content to the reason."""

    paths: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    lines: np.ndarray = field(default_factory=_empty)
    symbols: list[tuple[str, ...]] = field(default_factory=list)
    doc_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=_I64))
    spans: np.ndarray = field(default_factory=lambda: _empty(_I32, (0, 2)))
    doc_len: np.ndarray = field(default_factory=_empty)
    vocab: list[str] = field(default_factory=list)
    term_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=_I64))
    term_docs: np.ndarray = field(default_factory=lambda: _empty(_I32))
    term_tf: np.ndarray = field(default_factory=lambda: _empty(_I32))
    is_test: np.ndarray = field(default_factory=lambda: _empty(bool))
    test_pairs: np.ndarray = field(default_factory=lambda: _empty(_I64, (0, 2)))  # (source, test)
    skipped: dict[str, str] = field(default_factory=dict)
    by_name: Lookup = field(default_factory=_empty_lookup)  # lowercased file name -> files
    by_stem: Lookup = field(default_factory=_empty_lookup)  # lowercased file stem -> files
    by_symbol: Lookup = field(default_factory=_empty_lookup)  # symbol (exact case) -> files

    # ------------------------------------------------------------ lookups, built on first use

    @property
    def n_docs(self) -> int:
        return len(self.doc_len)

    @property
    def chunk_starts(self) -> np.ndarray:
        """Index of each file's first document."""
        return self.doc_ptr[:-1]

    @cached_property
    def keys(self) -> list[str]:
        return [analysis_key(b, p) for p, b in zip(self.paths, self.blobs)]

    @cached_property
    def file_of_doc(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.paths), dtype=_I64), np.diff(self.doc_ptr))

    @cached_property
    def term_cols(self) -> np.ndarray:
        """The term of each entry."""
        return np.repeat(np.arange(len(self.vocab), dtype=_I64), np.diff(self.term_ptr))

    @cached_property
    def by_path(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    @cached_property
    def tests_for(self) -> dict[int, list[int]]:
        """Source file -> its paired test files."""
        out: dict[int, list[int]] = {}
        for s, t in self.test_pairs.tolist():
            out.setdefault(s, []).append(t)
        return out

    @cached_property
    def _idf(self) -> np.ndarray:
        df = np.diff(self.term_ptr).astype(np.float64)
        return np.log(1 + (self.n_docs - df + 0.5) / (df + 0.5))

    @cached_property
    def _norm(self) -> np.ndarray:
        dl = self.doc_len.astype(np.float64)
        avg = float(dl.mean()) if self.n_docs and dl.sum() else 1.0
        return K1 * ((1 - B) + B * dl / avg)

    # ------------------------------------------------------------ BM25

    def term_ids(self, tokens: Iterable[str]) -> list[int]:
        """Ids of the tokens the corpus has, in the order given."""
        out = []
        vocab = self.vocab
        for t in tokens:
            i = bisect_left(vocab, t)
            if i < len(vocab) and vocab[i] == t:
                out.append(i)
        return out

    def scores(self, ids: Sequence[int]) -> np.ndarray:
        """BM25 score of every document for the terms `ids` (summed in that order)."""
        out = np.zeros(self.n_docs, dtype=np.float64)
        idf, norm = self._idf, self._norm
        for t in ids:
            lo, hi = int(self.term_ptr[t]), int(self.term_ptr[t + 1])
            docs = self.term_docs[lo:hi]
            tf = self.term_tf[lo:hi].astype(np.float64)
            out[docs] += idf[t] * tf / (norm[docs] + tf)
        return out

    def files_with(self, term: int) -> int:
        """How many files have term `term` in some document (their path included)."""
        lo, hi = int(self.term_ptr[term]), int(self.term_ptr[term + 1])
        files = self.file_of_doc[self.term_docs[lo:hi]]  # ascending: documents are sorted
        return int(files.size and 1 + np.count_nonzero(files[1:] != files[:-1]))

    def file_terms(self, i: int) -> list[Counter[str]]:
        """File i's documents as term counts (the path's words included)."""
        lo, hi = int(self.doc_ptr[i]), int(self.doc_ptr[i + 1])
        docs = [Counter[str]() for _ in range(hi - lo)]
        sel = np.flatnonzero((self.term_docs >= lo) & (self.term_docs < hi))
        for d, c, n in zip(self.term_docs[sel].tolist(), self.term_cols[sel].tolist(),
                           self.term_tf[sel].tolist()):
            docs[d - lo][self.vocab[c]] = n
        return docs


# ---------------------------------------------------------------- test pairing


def _by_stem(paths: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        out.setdefault(PurePosixPath(p).stem.lower(), []).append(i)
    return out


def _pair_tests(
    paths: Sequence[str], by_stem: dict[str, list[int]], is_test: np.ndarray
) -> dict[int, list[int]]:
    """Pair each test file (test_x.py, x_test.go, x.test.ts) with the source files of stem x
    and the same extension that share the most directory names with it
    (tests/orm/test_session.py goes with lib/orm/session.py rather than lib/ext/session.py)."""
    tests_for: dict[int, list[int]] = {}
    for t, path in enumerate(paths):
        src_stem = source_stem_of_test(path)
        if not src_stem:
            continue
        suffix = PurePosixPath(path).suffix
        sources = [
            s
            for s in by_stem.get(src_stem.lower(), [])
            if not is_test[s] and PurePosixPath(paths[s]).suffix == suffix
        ]
        if not sources:
            continue
        test_dirs = set(PurePosixPath(path).parts[:-1])
        overlap = {s: len(test_dirs & set(PurePosixPath(paths[s]).parts[:-1])) for s in sources}
        best = max(overlap.values())
        for s in sources:
            if overlap[s] == best:
                tests_for.setdefault(s, []).append(t)
    return tests_for


# ---------------------------------------------------------------- assembling


def _path_counts(path: str, tokenize: Callable[[str], list[str]]) -> Counter[str]:
    # The path's words count in every chunk: "settings" finds settings.py anywhere in it.
    return Counter(tokenize(path.replace(".", " ")))


def assemble(
    old: Corpus,
    files: Sequence[tuple[str, str]],
    fresh: dict[str, FileAnalysis],
    skipped: dict[str, str],
    tokenize: Callable[[str], list[str]],
) -> Corpus:
    """The corpus of `files` ((path, blob) in path order), built from `old`: a file whose
    path and blob `old` has keeps its entries; another file takes its counts from `fresh`
    (analyses with tokens, by blob key) or from the file of the same blob key in `old`."""
    old_at = old.by_path
    old_key_at: dict[str, int] = {}
    for j, key in enumerate(old.keys if old.paths else []):
        old_key_at.setdefault(key, j)
    file_map = np.full(len(old.paths), -1, dtype=_I64)  # old file -> new file, if kept
    counts = np.zeros(len(files), dtype=_I64)  # documents per new file
    added: list[tuple[int, list[Counter[str]], list[tuple[int, int]]]] = []
    lines = np.zeros(len(files), dtype=_I64)
    symbols: list[tuple[str, ...]] = []
    for i, (path, blob) in enumerate(files):
        j = old_at.get(path)
        if j is not None and old.blobs[j] == blob:
            file_map[j] = i
            counts[i] = old.doc_ptr[j + 1] - old.doc_ptr[j]
            lines[i] = old.lines[j]
            symbols.append(old.symbols[j])
            continue
        key = analysis_key(blob, path)
        new_path = _path_counts(path, tokenize)
        a = fresh.get(key)
        if a is not None:
            docs = [Counter(c.tokens) for c in a.chunks] or [Counter[str]()]
            spans = [(c.start_line, c.end_line) for c in a.chunks] or [(0, 0)]
            lines[i], sym = a.lines, a.symbols
        else:  # the same content under another path: its counts less that path's words
            j = old_key_at[key]
            docs = old.file_terms(j)
            for term, n in _path_counts(old.paths[j], tokenize).items():
                for d in docs:
                    d[term] -= n
                    if d[term] <= 0:
                        del d[term]
            lo, hi = int(old.doc_ptr[j]), int(old.doc_ptr[j + 1])
            spans = [tuple(s) for s in old.spans[lo:hi].tolist()]
            lines[i], sym = old.lines[j], old.symbols[j]
        for d in docs:
            d.update(new_path)
        symbols.append(tuple(sym))
        counts[i] = len(docs)
        added.append((i, docs, spans))  # type: ignore[arg-type]

    doc_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(_I64)
    n_docs = int(doc_ptr[-1])

    # Kept entries: renumber documents (kept files keep their order, so the map is monotone).
    old_file_of_doc = old.file_of_doc if old.paths else _empty()
    old_docs_n = len(old_file_of_doc)
    offset = np.zeros(len(old.paths), dtype=_I64)
    kept_files = file_map >= 0
    offset[kept_files] = doc_ptr[file_map[kept_files]] - old.doc_ptr[:-1][kept_files]
    doc_map = np.arange(old_docs_n, dtype=_I64) + offset[old_file_of_doc]
    doc_map[file_map[old_file_of_doc] < 0] = -1
    keep = doc_map[old.term_docs] >= 0 if len(old.term_docs) else np.zeros(0, dtype=bool)
    k_cols_old = old.term_cols[keep]

    # Added entries, as term strings for now.
    a_terms: list[str] = []
    a_tf: list[int] = []
    a_docs: list[int] = []
    spans_new = np.zeros((n_docs, 2), dtype=_I32)
    if old_docs_n:
        kept_docs = np.flatnonzero(doc_map >= 0)
        spans_new[doc_map[kept_docs]] = old.spans[kept_docs]
    for i, docs, spans in added:
        base = int(doc_ptr[i])
        spans_new[base:base + len(spans)] = spans
        for d, c in enumerate(docs):
            a_terms.extend(c.keys())
            a_tf.extend(c.values())
            a_docs.extend([base + d] * len(c))

    # The vocabulary: the old terms still in use and the new ones, sorted.
    used_old = np.flatnonzero(np.bincount(k_cols_old, minlength=len(old.vocab)) > 0)
    kept_terms = [old.vocab[t] for t in used_old.tolist()]
    extra = sorted(set(a_terms).difference(kept_terms))
    vocab = sorted(kept_terms + extra)  # two sorted runs: a merge
    is_extra = np.zeros(len(vocab), dtype=bool)
    is_extra[[bisect_left(vocab, t) for t in extra]] = True
    remap = np.full(len(old.vocab), -1, dtype=_I64)
    remap[used_old] = np.flatnonzero(~is_extra)
    k_cols = remap[k_cols_old]
    k_docs = doc_map[old.term_docs[keep]]
    k_tf = old.term_tf[keep]
    if a_terms:
        position = {t: bisect_left(vocab, t) for t in set(a_terms)}
        n = len(a_terms)
        a_cols = np.fromiter(map(position.__getitem__, a_terms), dtype=_I64, count=n)
        a_docs_arr = np.array(a_docs, dtype=_I64)
        a_tf_arr = np.array(a_tf, dtype=_I32)
        order = np.lexsort((a_docs_arr, a_cols))
        a_cols, a_docs_arr, a_tf_arr = a_cols[order], a_docs_arr[order], a_tf_arr[order]
        # Merge the sorted added entries into the sorted kept ones (by term, then document).
        at = np.searchsorted(k_cols * n_docs + k_docs, a_cols * n_docs + a_docs_arr)
        cols = np.insert(k_cols, at, a_cols)
        term_docs = np.insert(k_docs, at, a_docs_arr).astype(_I32)
        term_tf = np.insert(k_tf, at, a_tf_arr).astype(_I32)
    else:
        cols, term_docs, term_tf = k_cols, k_docs.astype(_I32), k_tf.astype(_I32)
    term_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=len(vocab)))])
    doc_len = np.bincount(term_docs, weights=term_tf, minlength=n_docs).astype(_I64)

    paths = [p for p, _ in files]
    if paths == old.paths:  # only contents changed: what depends on paths alone stays
        is_test, test_pairs, by_name, by_stem = old.is_test, old.test_pairs, old.by_name, old.by_stem
    else:
        is_test = np.array([is_test_path(p) for p in paths], dtype=bool)
        tests_for = _pair_tests(paths, _by_stem(paths), is_test)
        test_pairs = np.array([(s, t) for s, ts in tests_for.items() for t in ts], dtype=_I64)
        names = [p.rpartition("/")[2] for p in paths]
        by_name = Lookup.build((name.lower(), i) for i, name in enumerate(names))
        by_stem = Lookup.build((_stem(name).lower(), i) for i, name in enumerate(names))
    if symbols == old.symbols:
        by_symbol = old.by_symbol
    else:
        by_symbol = Lookup.build((sym, i) for i, defined in enumerate(symbols) for sym in defined
                                 if len(sym) >= 3 and not sym.startswith("__"))
    return Corpus(
        by_name=by_name, by_stem=by_stem, by_symbol=by_symbol,
        paths=paths, blobs=[b for _, b in files], lines=lines, symbols=symbols,
        doc_ptr=doc_ptr, spans=spans_new, doc_len=doc_len, vocab=vocab,
        term_ptr=term_ptr.astype(_I64), term_docs=term_docs, term_tf=term_tf,
        is_test=is_test, test_pairs=test_pairs.reshape(-1, 2), skipped=dict(skipped),
    )


def _stem(name: str) -> str:
    """A file name without its extension, as `PurePosixPath(name).stem` gives it."""
    i = name.rfind(".")
    return name[:i] if 0 < i < len(name) - 1 else name


# ---------------------------------------------------------------- the file on disk

_LOOKUPS = ("by_name", "by_stem", "by_symbol")
_ARRAYS = ("lines", "doc_ptr", "spans", "doc_len", "term_ptr", "term_docs", "term_tf",
           "is_test", "test_pairs")


def _join(items: Sequence[str]) -> bytes:
    # NUL never occurs in a git path, a symbol or a token.
    return "\0".join(items).encode("utf-8", "surrogateescape")


def _split(data: bytes, n: int) -> list[str]:
    return data.decode("utf-8", "surrogateescape").split("\0") if n else []


def save(path: Path, corpus: Corpus, header: dict) -> None:
    """Write `corpus` to `path` atomically, with `header` (what it depends on)."""
    flat_symbols = [s for names in corpus.symbols for s in names]
    strings = {
        "paths": corpus.paths, "blobs": corpus.blobs, "vocab": corpus.vocab,
        "symbols": flat_symbols, "skipped_keys": list(corpus.skipped),
        "skipped_reasons": list(corpus.skipped.values()),
    }
    blobs: list[tuple[str, np.ndarray]] = [
        (name, np.ascontiguousarray(getattr(corpus, name))) for name in _ARRAYS
    ]
    blobs.append(("symbol_counts", np.array([len(s) for s in corpus.symbols], dtype=_I64)))
    for name in _LOOKUPS:
        lookup = getattr(corpus, name)
        strings[name] = lookup.keys
        blobs += [(f"{name}.ptr", lookup.ptr), (f"{name}.files", lookup.files)]
    blobs += [(f"s:{k}", np.frombuffer(_join(v), dtype=np.uint8)) for k, v in strings.items()]
    meta = {"header": header, "counts": {k: len(v) for k, v in strings.items()}, "arrays": []}
    offset = 0
    for name, arr in blobs:
        meta["arrays"].append([name, arr.dtype.str, list(arr.shape), offset])
        offset += arr.nbytes
    head = json.dumps(meta, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corpus-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_MAGIC + len(head).to_bytes(8, "little") + head)
            for _, arr in blobs:
                fh.write(arr.tobytes())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, header: dict) -> Corpus | None:
    """The corpus saved at `path`, or None when it is missing, unreadable, or was written
    with another `header`."""
    try:
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            return None
        start = len(_MAGIC) + 8
        size = int.from_bytes(data[len(_MAGIC):start], "little")
        meta = json.loads(data[start:start + size])
        if meta["header"] != header:
            return None
        base = start + size
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape, offset in meta["arrays"]:
            dt = np.dtype(dtype)
            count = int(np.prod(shape))
            if base + offset + count * dt.itemsize > len(data):
                return None
            arrays[name] = np.frombuffer(data, dtype=dt, count=count,
                                         offset=base + offset).reshape(shape)
        counts = meta["counts"]
        s = {k: _split(arrays[f"s:{k}"].tobytes(), counts[k]) for k in counts}
        flat, sym_counts = s["symbols"], arrays["symbol_counts"].tolist()
        symbols, at = [], 0
        for n in sym_counts:
            symbols.append(tuple(flat[at:at + n]))
            at += n
        corpus = Corpus(
            paths=s["paths"], blobs=s["blobs"], symbols=symbols, vocab=s["vocab"],
            skipped=dict(zip(s["skipped_keys"], s["skipped_reasons"])),
            **{name: arrays[name] for name in _ARRAYS},
            **{name: Lookup(s[name], arrays[f"{name}.ptr"], arrays[f"{name}.files"])
               for name in _LOOKUPS},
        )
        n = len(corpus.paths)
        consistent = (
            len(corpus.blobs) == len(symbols) == len(corpus.lines) == len(corpus.is_test) == n
            and len(corpus.doc_ptr) == n + 1 and int(corpus.doc_ptr[-1]) == corpus.n_docs
            and len(corpus.spans) == corpus.n_docs and len(corpus.term_ptr) == len(corpus.vocab) + 1
            and int(corpus.term_ptr[-1]) == len(corpus.term_docs) == len(corpus.term_tf)
        )
        return corpus if consistent else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
