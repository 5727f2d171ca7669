"""Model backends. `collect` is the one loop both backends use to turn a stream into text,
and `generation` the one way both turn that stream into the port's `Generation`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from bot.ports import Generation, GenerationParams


def collect(pieces: Iterable[str], on_text: Callable[[str], None] | None = None) -> str:
    """Join streamed pieces, handing each to `on_text` as it arrives."""
    out = []
    for piece in pieces:
        out.append(piece)
        if on_text:
            on_text(piece)
    return "".join(out)


def cut_at_stop(text: str, stops: Iterable[str]) -> str:
    """`text` up to the first of the stop strings, each cut in turn (the server's way)."""
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text


def generation(
    run: Callable[[dict], Iterator[str]], params: GenerationParams, model: str,
    on_text: Callable[[str], None] | None = None, *, stops_in_output: bool = False,
) -> Generation:
    """Generate by draining `run(stats)`: the answer after `params.prefix`, the model it came
    from (`stats["model"]`, else `model`), token counts and finish reason from `stats`.

    `stops_in_output`: the backend streams the stop string itself (transformers does), so
    the answer is cut there; what `on_text` saw is not taken back."""
    started = time.perf_counter()
    stats: dict = {}
    text = collect(run(stats), on_text)
    if stops_in_output:
        text = cut_at_stop(text, params.stop)
    return Generation(
        text=params.prefix + text,
        model=stats.get("model") or model,
        prompt_tokens=stats.get("prompt_tokens", 0),
        completion_tokens=stats.get("completion_tokens", 0),
        seconds=time.perf_counter() - started,
        finish_reason=stats.get("finish_reason", "stop"),
    )
