"""Ranking files for a requirement: BM25 over each file's line windows, normalised so the best
file scores 1.0, plus boosts when the requirement names a file's path, its name or stem, or a
symbol it defines; a test file paired with a ranked source file follows it closely.

`rank` reads a `Corpus` (inference/corpus.py) and holds no state of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np

from inference.corpus import Corpus
from inference.tokens import IDENT_RE, Tokenizer


@dataclass
class ScoredFile:
    """A ranked file: a score (BM25 normalised to 1.0 plus boosts) and why it ranked."""

    path: str
    score: float
    reasons: list[str] = field(default_factory=list)


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


_GENERIC_STEMS = frozenset(
    {"__init__", "__main__", "index", "main", "setup", "conftest", "mod", "lib", "init", "readme"}
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
    for m in IDENT_RE.finditer(requirement):
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
            identifiers.update(IDENT_RE.findall(code))
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


def _rarity(corpus: Corpus, tokenizer: Tokenizer, word: str) -> float:
    """How rare a word is across the files, from 0 (in every file) to 1 (in one file): a
    normalised inverse document frequency. A file named after a rare word ("mssqlpython")
    is a stronger hint than one named after a common one ("session", "performance")."""
    tokens = tokenizer.identifier(word)
    n = len(corpus.paths)
    if not tokens or not len(corpus.term_docs) or n < 2:
        return 1.0
    ids = corpus.term_ids([tokens[-1]])
    if not ids:
        return 1.0
    df = corpus.files_with(ids[0])
    return float(min(1.0, max(0.0, np.log((n + 1) / (df + 0.5)) / np.log(n + 1))))


def _mention_boosts(
    corpus: Corpus, mentions: _Mentions, w: RankWeights, tokenizer: Tokenizer
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
            exact = [i for i in hits if PurePosixPath(corpus.paths[i]).name == token]
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


# ---------------------------------------------------------------- ranking


def rank(
    corpus: Corpus, requirement: str, k: int, w: RankWeights, tokenizer: Tokenizer
) -> list[ScoredFile]:
    """The `k` files of `corpus` most relevant to `requirement`, best first (ties by path);
    only files with a positive score."""
    n = len(corpus.paths)
    if n == 0 or k <= 0:
        return []
    reasons: dict[int, list[str]] = {}
    # BM25 per chunk; per file the best chunk plus a little for other matching chunks,
    # normalised so the best file scores 1.0 and the boosts below mean the same in
    # every repository.
    text = np.zeros(n, dtype=np.float64)
    chunk_scores = np.zeros(0, dtype=np.float64)
    query = list(dict.fromkeys(tokenizer(requirement)))
    ids = corpus.term_ids(query)
    if ids:
        chunk_scores = corpus.scores(ids)
        best = np.maximum.reduceat(chunk_scores, corpus.chunk_starts)
        total = np.add.reduceat(chunk_scores, corpus.chunk_starts)
        extra = np.minimum(w.extra_chunks * (total - best), w.extra_chunks_cap * best)
        raw = best + extra
        if raw.max() > 0:
            text = raw / raw.max()
    scores = text.copy()

    for i, items in _mention_boosts(corpus, _mentions(requirement), w, tokenizer).items():
        for value, why in items:
            scores[i] += value
            reasons.setdefault(i, []).append(f"{why} (+{value:.2f})")

    # Tests follow their source file: score slightly below it unless they beat it.
    order = sorted(np.flatnonzero(scores > 0), key=lambda i: (-scores[i], corpus.paths[i]))
    sources = [i for i in order if not corpus.is_test[i]][: w.paired_sources]
    for s in sources:
        paired = corpus.tests_for.get(int(s), [])
        paired = sorted(paired, key=lambda t: (-scores[t], corpus.paths[t]))
        for t in paired[: w.tests_per_source]:
            target = scores[s] * w.paired_test
            if target > scores[t]:
                scores[t] = target
                reasons.setdefault(t, []).append(f"test for {corpus.paths[s]}")

    ranked = sorted(
        (int(i) for i in np.flatnonzero(scores > 0)),
        key=lambda i: (-round(float(scores[i]), 6), corpus.paths[i]),
    )[:k]
    out = []
    for i in ranked:
        why = _text_reason(corpus, chunk_scores, i, float(text[i])) + reasons.get(i, [])
        out.append(ScoredFile(corpus.paths[i], round(float(scores[i]), 6), why))
    return out


def _text_reason(corpus: Corpus, chunk_scores: np.ndarray, i: int, score: float) -> list[str]:
    """Where file `i` matched the requirement's words: its best window, how many matched."""
    if score <= 0:
        return []
    start, end = int(corpus.doc_ptr[i]), int(corpus.doc_ptr[i + 1])
    local = chunk_scores[start:end]
    lo, hi = (int(x) for x in corpus.spans[start + int(np.argmax(local))])
    matching = int(np.count_nonzero(local > 0))
    where = f"lines {lo}-{hi}" if hi else "path"
    more = f", {matching} matching chunks" if matching > 1 else ""
    return [f"text match {score:.2f} ({where}{more})"]
