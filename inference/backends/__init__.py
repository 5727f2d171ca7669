"""Model backends. `collect` is the one loop both backends use to turn a stream into text."""

from __future__ import annotations

from collections.abc import Callable, Iterable


def collect(pieces: Iterable[str], on_text: Callable[[str], None] | None = None) -> str:
    """Join streamed pieces, handing each to `on_text` as it arrives."""
    out = []
    for piece in pieces:
        out.append(piece)
        if on_text:
            on_text(piece)
    return "".join(out)
