"""In-memory fakes at ports (docs/architecture.md): a backend that answers from a script.

Used where a test needs a particular model answer (no parsable edit, an edit into a
protected path); the real model is used everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bot.ports import Generation, GenerationParams, Message
from bot.reqtests import TEST_WRITER_SYSTEM


class ScriptedBackend:
    """Answers with the given texts in turn (the last one repeats).

    A request for a requirement test (the test writer's system prompt) is answered from
    `tests` instead (in turn; by default an answer with no test file), and recorded in
    `test_calls`, so scripts for changes stay as they are.
    """

    def __init__(self, *answers: str, name: str = "scripted", tests: tuple[str, ...] = ()):
        self.answers = list(answers)
        self.tests = list(tests) or ["I cannot write a test for this."]
        self.test_calls: list[list[Message]] = []
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
        if messages and messages[0].content == TEST_WRITER_SYSTEM:
            self.test_calls.append(list(messages))
            answer = self.tests[min(len(self.test_calls) - 1, len(self.tests) - 1)]
            return Generation(text=answer, model=self.model_name, prompt_tokens=10,
                              completion_tokens=self.count_tokens(answer), seconds=0.0)
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
