"""BM25 tokens: identifiers split on snake_case and camelCase, lowercased, lightly stemmed.

The index tokenises file contents with it and `rank` tokenises the requirement with it, so
both sides agree on what a word is.
"""

from __future__ import annotations

import re

IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
        for ident in IDENT_RE.findall(text):
            out.extend(self.identifier(ident))
        return out

