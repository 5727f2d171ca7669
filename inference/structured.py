"""Constrained answers: ask the model to pick one of a few options.

With vLLM the server enforces the constraint (`structured_outputs.choice`); the embedded
backend scores each option. Either way the answer is one of the options, never free text
that a parser has to guess at.
"""

from __future__ import annotations

from bot.ports import Backend, BackendError, GenerationParams, Message


def choose(
    backend: Backend,
    messages: list[Message],
    options: list[str] | tuple[str, ...],
    *,
    model: str | None = None,
) -> str:
    """One of `options`, as the model answers `messages`."""
    options = tuple(dict.fromkeys(o for o in options if o))
    if not options:
        raise ValueError("choose() needs at least one non-empty option")
    if len(options) == 1:
        return options[0]
    longest = max(len(o) for o in options)
    params = GenerationParams(
        max_tokens=max(4, longest // 2 + 8), temperature=0.0, choice=options, model=model
    )
    answer = backend.generate(messages, params).text.strip()
    if answer not in options:  # a server that ignored the constraint
        raise BackendError(
            f"the model server answered {answer[:80]!r}, not one of {list(options)}: "
            "it does not support structured outputs (vLLM does)"
        )
    return answer
