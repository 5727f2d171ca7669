"""Generation through an OpenAI-compatible server: vLLM first, any compatible server otherwise.

The official `openai` client does the HTTP and its retries: a request that fails with 408,
429, 5xx, a connection error or a timeout is sent again up to `backend.max_retries` times,
after the server's Retry-After (up to two minutes) or an exponential backoff with jitter.
What the client cannot retry is a stream that opened and then broke: this adapter retries
that itself while no token has arrived, and never once a token was passed on (it cannot be
taken back). It decides what to send and turns the server's answers into the port's values
and exceptions:

- a prompt that does not fit the context window -> `ContextTooLong` (the server's words);
- an unknown model -> `BackendError` naming the models the server does serve;
- a server that cannot be reached -> `BackendError(retryable=True)` naming the URL.

Answer prefixes ("prefill") use vLLM's chat-completion extras `continue_final_message` and
`add_generation_prompt` (see `ChatCompletionRequest` in vLLM's
`vllm/entrypoints/openai/chat_completion/protocol.py`): the prefix is sent as a final
assistant message that the model continues.
"""

from __future__ import annotations

import email.utils
import importlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import openai

from bot.ports import BackendError, ContextTooLong, Generation, GenerationParams, Message
from bot.settings import BackendSettings
from inference.backends import cut_at_stop, generation

log = logging.getLogger(__name__)

# What servers say when a prompt does not fit. vLLM: "This model's maximum context length is
# N tokens. However, your request has M input tokens..." or "'max_tokens' ... is too large:
# X. This model's maximum context length is N tokens and your request has M input tokens".
_CONTEXT_PATTERNS = re.compile(
    r"maximum context length|context length|context window|is too long|too many tokens"
    r"|prompt is too long|input tokens",
    re.IGNORECASE,
)
_RETRY_STATUSES = frozenset({408, 429})  # and every 5xx: what the client retried before
# The OpenAI API, and vLLM's server with it, refuse more than 4 stop strings (HTTP 400:
# "List should have at most 4 items"); the rest are applied here, to the answer as it arrives.
_SERVER_STOPS = 4
# Seconds: the client does not retry after a longer Retry-After (openai's
# MAX_RETRY_AFTER_DELAY); a broken stream's retry waits at most this long.
_LONGEST_RETRY_AFTER = 120.0


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network errors that older `openai` versions let escape while a stream is read."""
    found: list[type[BaseException]] = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


class _Retry(Exception):
    """One failed attempt that a later attempt may fix."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class OpenAIBackend:
    """A `Backend` that generates through an OpenAI-compatible chat-completions server."""

    def __init__(
        self,
        settings: BackendSettings,
        *,
        tokenizer_counter: Callable[[str], int] | None = None,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 20.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """`backoff_seconds` is the first nominal delay before a broken stream is asked again;
        each retry doubles it, up to `max_backoff_seconds`, with random jitter. (Requests that
        fail before a stream opens are retried by the `openai` client with its own backoff.)"""
        self.settings = settings
        self._url = settings.base_url.rstrip("/")
        self.base_url = _without_userinfo(self._url)  # for messages and logs
        self.model = settings.model
        self.name = f"openai:{settings.model}"
        self._count = tokenizer_counter
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._sleep = sleep
        self._windows: dict[str, int] = {}
        self._client = openai.OpenAI(
            base_url=self._url,
            api_key=settings.api_key.get_secret_value(),
            timeout=settings.timeout_seconds,
            max_retries=settings.max_retries,
        )

    def __repr__(self) -> str:  # no api key in reprs, logs or tracebacks
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ Backend
    def count_tokens(self, text: str) -> int:
        if self._count is not None:
            return self._count(text)
        return len(text) // 3  # rough: code runs about 3 characters a token

    def context_window(self, model: str | None = None) -> int:
        """The served model's context (`max_model_len` in GET /v1/models, as vLLM reports
        it), capped by `context_tokens` when that is set. An adapter without its own figure
        has its base model's; a server that reports none gets `context_tokens` or 2,048."""
        name = model or self.model
        if name not in self._windows:
            page = self._call(lambda: self._client.models.list())
            cards = {m.id: m for m in page.data}
            card = cards.get(name)
            own = _max_model_len(card) if card is not None else None
            if own is None and card is not None:  # a LoRA adapter: its parent's or root's
                for key in ("parent", "root"):
                    base = cards.get(getattr(card, key, None) or "")
                    own = own or (_max_model_len(base) if base is not None else None)
            if own is None:
                known = [n for n in (_max_model_len(m) for m in page.data) if n]
                own = min(known) if known else None
            self._windows[name] = own or self.settings.context_tokens or 2048
        cap = self.settings.context_tokens
        return min(self._windows[name], cap) if cap else self._windows[name]

    def list_models(self) -> list[str]:
        """The model and adapter names the server serves (GET /v1/models)."""
        page = self._call(lambda: self._client.models.list())
        return [m.id for m in page.data]

    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[str]:
        yield from self._stopped(self._run(messages, params, stats={}), params.stop, {})

    def generate(
        self,
        messages: list[Message],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        return generation(
            lambda stats: self._stopped(self._run(messages, params, stats), params.stop, stats),
            params, params.model or self.model, on_text)

    @staticmethod
    def _stopped(pieces: Iterator[str], stops: Sequence[str], stats: dict) -> Iterator[str]:
        """The stop strings the server was not sent (past its limit) applied to the stream:
        the text ends before the first of them, and the stream is closed there (the server
        stops generating when the client goes). Up to the longest stop's length less one
        character is held back, so a stop split across pieces is found."""
        local = [s for s in stops[_SERVER_STOPS:] if s]
        if not local:
            yield from pieces
            return
        hold = max(map(len, local)) - 1
        buf = ""
        for piece in pieces:
            buf += piece
            cut = cut_at_stop(buf, local)
            if len(cut) < len(buf):
                if cut:
                    yield cut
                stats["finish_reason"] = "stop"
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
                return
            if len(buf) > hold:
                yield buf[: len(buf) - hold]
                buf = buf[len(buf) - hold:]
        if buf:
            yield buf

    def generate_n(
        self, messages: list[Message], params: GenerationParams, n: int
    ) -> list[Generation]:
        """`n` answers to one prompt in one request (the API's `n`; vLLM batches them)."""
        kwargs = self._request(messages, params)
        kwargs.pop("stream_options", None)
        kwargs.update(stream=False, n=n)
        started = time.perf_counter()
        reply = self._call(lambda: self._client.chat.completions.create(**kwargs))
        seconds = time.perf_counter() - started
        echo = params.prefix if params.prefix and not self.settings.supports_prefill else ""
        usage = reply.usage
        out = []
        for choice in sorted(reply.choices, key=lambda c: c.index):
            text = choice.message.content or ""
            if echo and text.startswith(echo):
                text = text[len(echo):]
            cut = cut_at_stop(text, params.stop[_SERVER_STOPS:])
            stopped_here, text = len(cut) < len(text), cut
            out.append(Generation(
                text=params.prefix + text,
                model=reply.model or params.model or self.model,
                prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
                completion_tokens=((usage.completion_tokens or 0) // max(len(reply.choices), 1))
                if usage else 0,
                seconds=seconds,
                finish_reason=("length" if choice.finish_reason == "length" and not stopped_here
                               else "stop"),
            ))
        if not out:
            raise BackendError(f"the model server at {self.base_url} returned no answer",
                               retryable=True)
        return out

    # ------------------------------------------------------------------ request
    def _request(self, messages: list[Message], params: GenerationParams) -> dict:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        kwargs: dict = {
            "model": params.model or self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            kwargs["stop"] = list(params.stop)[:_SERVER_STOPS]  # the rest: _stopped, cut_at_stop
        extra: dict = {}
        if params.choice and params.regex:
            raise BackendError("ask for a choice or a regex, not both")
        if params.choice:  # vLLM's structured outputs; the removed guided_* fields are ignored
            extra["structured_outputs"] = {"choice": list(params.choice)}
        elif params.regex:
            extra["structured_outputs"] = {"regex": params.regex}
        if params.prefix and self.settings.supports_prefill:
            chat.append({"role": "assistant", "content": params.prefix})
            extra.update(continue_final_message=True, add_generation_prompt=False)
        elif params.prefix:
            ask = f"Start your answer with:\n{params.prefix}"
            if chat and chat[-1]["role"] == "user":
                chat[-1] = {"role": "user", "content": f"{chat[-1]['content']}\n\n{ask}"}
            else:
                chat.append({"role": "user", "content": ask})
        kwargs["messages"] = chat
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _run(self, messages: list[Message], params: GenerationParams, stats: dict) -> Iterator[str]:
        kwargs = self._request(messages, params)
        model = kwargs["model"]
        # Without prefill the model writes the prefix itself; it is not part of the continuation.
        echo = params.prefix if params.prefix and not self.settings.supports_prefill else ""
        # The client retried the request until the stream opened (`_call`). A stream that
        # breaks before its first token is asked again here; after one, the error stands.
        attempt = 0
        while True:
            streamed = False
            try:
                stream = self._call(lambda: self._client.chat.completions.create(**kwargs), model)
                with stream:
                    pieces = self._pieces(stream, stats, model)
                    for piece in _without_echo(pieces, echo) if echo else pieces:
                        streamed = True
                        yield piece
                return
            except _Retry as failure:
                if streamed:
                    raise BackendError(
                        f"the model server at {self.base_url} failed mid-answer: {failure.message}",
                        retryable=True,
                    ) from failure
                if attempt >= self.settings.max_retries:
                    raise BackendError(
                        self._gave_up(failure.message, attempt), retryable=True
                    ) from failure
                attempt += 1
                self._wait(attempt, failure, "generate")

    def _pieces(self, stream, stats: dict, model: str) -> Iterator[str]:
        try:
            for chunk in stream:
                if chunk.model:
                    stats["model"] = chunk.model
                if chunk.usage is not None:
                    stats["prompt_tokens"] = chunk.usage.prompt_tokens or 0
                    stats["completion_tokens"] = chunk.usage.completion_tokens or 0
                for choice in chunk.choices:
                    if choice.finish_reason:
                        stats["finish_reason"] = (
                            "length" if choice.finish_reason == "length" else "stop"
                        )
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
        except openai.APIError as exc:  # an error event in the stream, or the connection broke
            raise self._translate(exc, model) from exc
        except _TRANSPORT_ERRORS as exc:
            raise _Retry(f"the connection broke: {exc}") from exc

    # ------------------------------------------------------------------ errors and retries
    def _call(self, call: Callable, model: str | None = None):
        """One call through the client, which has retried what was worth retrying."""
        try:
            return call()
        except openai.APIError as exc:
            failure = self._translate(exc, model or self.model)
            if isinstance(failure, _Retry):
                waits_too_long = (failure.retry_after or 0) > _LONGEST_RETRY_AFTER
                retries = 0 if waits_too_long else self.settings.max_retries
                raise BackendError(self._gave_up(failure.message, retries), retryable=True) from exc
            raise failure from exc

    def _translate(self, exc: openai.APIError, model: str) -> Exception:
        """A `_Retry` for what a later attempt may fix; the port's exception otherwise."""
        if isinstance(exc, openai.APITimeoutError):
            return _Retry(f"no answer within {self.settings.timeout_seconds:g} s (timeout)")
        if isinstance(exc, openai.APIConnectionError):
            if _refused(exc):
                return _Retry("connection refused (is vLLM running?)")
            return _Retry(f"connection failed: {_root_cause(exc)}")
        message = _server_message(exc)
        if not isinstance(exc, openai.APIStatusError):  # an error event inside a stream
            if _CONTEXT_PATTERNS.search(message):
                return ContextTooLong(message)
            return _Retry(message)
        status = exc.status_code
        if status in _RETRY_STATUSES or status >= 500:
            return _Retry(f"HTTP {status}: {message}", retry_after=_retry_after(exc.response))
        if status == 400 and _CONTEXT_PATTERNS.search(message):
            return ContextTooLong(message)
        if status in (401, 403):
            return BackendError(
                f"the model server at {self.base_url} refused the API key (HTTP {status}): "
                f"{message}; check CODELOOP_BACKEND__API_KEY"
            )
        if status == 404:
            return BackendError(self._not_found(model, message))
        return BackendError(
            f"the model server at {self.base_url} answered HTTP {status}: {message}"
        )

    def _not_found(self, model: str, message: str) -> str:
        try:  # one try: this only words an error that is already certain
            served = [m.id for m in self._client.with_options(max_retries=0).models.list().data]
        except openai.APIError:
            served = None
        if served is not None and model not in served:
            names = ", ".join(served) or "(none)"
            return (
                f"the model server at {self.base_url} does not serve the model {model!r}; "
                f"it serves: {names} (set CODELOOP_BACKEND__MODEL or the repository's `model`)"
            )
        return (
            f"the model server at {self.base_url} answered 404: {message} "
            "(is base_url right? it usually ends in /v1)"
        )

    def _gave_up(self, message: str, retries: int) -> str:
        tries = f"after {retries} retries" if retries else "with no retries"
        if message.startswith("connection refused"):
            return f"cannot reach the model server at {self.base_url}: {message} ({tries})"
        return f"the model server at {self.base_url} did not answer {tries}: {message}"

    def _wait(self, attempt: int, failure: _Retry, what: str) -> None:
        if failure.retry_after is not None:
            delay = min(failure.retry_after, _LONGEST_RETRY_AFTER)
        else:
            nominal = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            delay = nominal / 2 + random.uniform(0, nominal / 2)
        log.warning(
            "%s: %s at %s; retry %d of %d in %.2f s",
            what,
            failure.message,
            self.base_url,
            attempt,
            self.settings.max_retries,
            delay,
        )
        self._sleep(delay)


# ---------------------------------------------------------------------- helpers


def _max_model_len(card) -> int | None:
    value = getattr(card, "max_model_len", None)
    if value is None and getattr(card, "model_extra", None):
        value = card.model_extra.get("max_model_len")
    try:
        return int(value) if value else None
    except (TypeError, ValueError):
        return None


def _without_echo(pieces: Iterator[str], prefix: str) -> Iterator[str]:
    """Drop the prefix when the model starts its answer by repeating it (no-prefill servers)."""
    target = prefix.lstrip()
    held = ""
    pieces = iter(pieces)
    for piece in pieces:
        held += piece
        stripped = held.lstrip()
        if len(stripped) < len(target) and target.startswith(stripped):
            continue  # may still turn out to be the prefix: wait for more
        rest = stripped[len(target) :] if stripped.startswith(target) else held
        if rest:
            yield rest
        yield from pieces
        return
    # The answer ended while it still looked like (part of) the prefix: nothing follows it.


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _server_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, str) and message:
            return message
        detail = body.get("detail")
        if isinstance(detail, str) and detail:
            return detail
    if isinstance(body, str) and body:
        return body
    return exc.message


def _refused(exc: BaseException) -> bool:
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, ConnectionRefusedError) or "refused" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _root_cause(exc: BaseException) -> str:
    current = exc
    for _ in range(10):
        nxt = current.__cause__ or current.__context__
        if nxt is None:
            break
        current = nxt
    return str(current) or type(current).__name__


def _retry_after(response) -> float | None:
    """Seconds from a Retry-After (seconds or HTTP date) or retry-after-ms header."""
    if response is None:
        return None
    headers = response.headers
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
