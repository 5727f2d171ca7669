"""In-memory fakes at ports (design rule 3): a backend that answers from a script.

Used where a test needs a particular model answer (no parsable edit, an edit into a
protected path); the real model is used everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bot.ports import Generation, GenerationParams, Message


class ScriptedBackend:
    """Answers with the given texts in turn (the last one repeats)."""

    def __init__(self, *answers: str, name: str = "scripted"):
        self.answers = list(answers)
        self.calls: list[list[Message]] = []
        self.name = f"scripted:{name}"
        self.model_name = name

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[str]:
        yield self.generate(messages, params).text[len(params.prefix):]

    def generate(
        self, messages: list[Message], params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        self.calls.append(list(messages))
        answer = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        if on_text is not None:  # streamed, as a server would (tests/openai_server.py)
            on_text(answer[len(params.prefix):])
        return Generation(
            text=answer, model=self.model_name, prompt_tokens=10,
            completion_tokens=self.count_tokens(answer), seconds=0.0, finish_reason="length",
        )


# A correct whole-file answer for the sample repository (bot.demo): adds whisper(text).
GOOD = '''textutil.py
```python
"""Small text helpers."""


def slugify(text):
    """Lower-case words joined by dashes."""
    return "-".join(text.lower().split())


def shout(text):
    """Upper-case text with an exclamation mark."""
    return text.upper() + "!"


def whisper(text):
    return text.lower() + "..."
```
'''
