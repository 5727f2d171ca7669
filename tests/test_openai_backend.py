"""OpenAIBackend against a real OpenAI-protocol peer on loopback.

The peer (tests/openai_server.py) generates with the real embedded model, so these tests
check real text, real token counts, streaming and prefill end to end; its fault knobs stand
in for an overloaded or absent vLLM.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bot.ports import BackendError, ContextTooLong, GenerationParams, Message
from bot.settings import BackendSettings
from inference.backends.openai_backend import OpenAIBackend

try:
    from tests.openai_server import Faults, serve_openai
except ImportError:  # pytest run without the repository root on sys.path
    from openai_server import Faults, serve_openai

SERVED = "smollm2-135m-instruct"
ASK = [
    Message("system", "You are a helpful coding assistant."),
    Message("user", "Write a Python function that adds two numbers."),
]
SHORT = GenerationParams(max_tokens=16, temperature=0.0)
FAST_BACKOFF = 0.01  # seconds: keeps retry tests quick


@pytest.fixture(scope="module")
def embedded():
    from inference.backends.embedded import ensure_converted
    from inference.backends.transformers_backend import TransformersBackend

    cache_dir = Path(
        os.environ.get("CODELOOP_TEST_MODEL_CACHE", Path.home() / ".cache/codeloop/models")
    )
    model_dir, _ = ensure_converted(cache_dir)
    return TransformersBackend(model_dir, model_name=SERVED, context_tokens=2048)


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def server(embedded, faults):
    with serve_openai(embedded, served_name=SERVED, faults=faults) as base_url:
        yield base_url


def make_backend(base_url: str, **overrides) -> OpenAIBackend:
    knobs = {k: overrides.pop(k) for k in ("backoff_seconds", "sleep") if k in overrides}
    knobs.setdefault("backoff_seconds", FAST_BACKOFF)
    overrides.setdefault("timeout_seconds", 60)
    settings = BackendSettings(kind="openai", model=SERVED, base_url=base_url, **overrides)
    return OpenAIBackend(settings, **knobs)


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------------- generation


@pytest.mark.model
def test_generate_returns_the_models_text_and_token_counts(server, embedded, faults):
    backend = make_backend(server)
    seen: list[str] = []

    gen = backend.generate(ASK, SHORT, on_text=seen.append)

    assert gen.text.strip()
    assert gen.model == SERVED
    assert 0 < gen.completion_tokens <= SHORT.max_tokens
    assert gen.finish_reason in ("stop", "length")
    assert "".join(seen) == gen.text
    # Greedy decoding: the same text and prompt size as the model gives directly.
    direct = embedded.generate(ASK, SHORT)
    assert gen.text == direct.text
    assert gen.prompt_tokens == direct.prompt_tokens
    sent = faults.bodies[-1]
    assert (
        sent["model"] == SERVED
        and sent["max_tokens"] == SHORT.max_tokens
        and sent["temperature"] == 0
    )
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest.mark.model
def test_more_than_four_stop_strings_are_cut_here_not_refused(server, faults):
    """The server takes at most four stop strings (vLLM answers 400 to more); the pipeline's
    one-definition edits send six. The rest are applied to the answer as it arrives."""
    backend = make_backend(server)
    params = GenerationParams(max_tokens=24, temperature=0.0)
    whole = backend.generate(ASK, params).text
    words = whole.split()
    assert len(words) > 4, whole
    late = " " + words[3]  # a stop string the answer reaches after some text
    stops = ("<<no1>>", "<<no2>>", "<<no3>>", "<<no4>>", "<<no5>>", late)
    expected = whole[: whole.find(late)]
    cut = replace(params, stop=stops)

    gen = backend.generate(ASK, cut)
    assert faults.bodies[-1]["stop"] == list(stops[:4])
    assert gen.text == expected and gen.finish_reason == "stop"
    assert "".join(backend.stream(ASK, cut)) == expected
    assert [g.text for g in backend.generate_n(ASK, cut, 2)] == [expected, expected]


@pytest.mark.model
def test_stream_yields_several_pieces(server):
    pieces = list(make_backend(server).stream(ASK, SHORT))

    assert len(pieces) > 1
    assert "".join(pieces).strip()


@pytest.mark.model
def test_prefix_is_continued_through_continue_final_message(server, faults):
    backend = make_backend(server)
    prefix = "```python\ndef add("
    params = GenerationParams(max_tokens=16, prefix=prefix)

    gen = backend.generate(ASK, params)

    assert gen.text.startswith(prefix) and len(gen.text) > len(prefix)
    sent = faults.bodies[-1]
    assert sent["messages"][-1] == {"role": "assistant", "content": prefix}
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    # stream() yields only the continuation, the same one (greedy).
    assert "".join(backend.stream(ASK, params)) == gen.text[len(prefix) :]


@pytest.mark.model
def test_prefix_goes_into_the_user_message_without_prefill(server, faults):
    backend = make_backend(server, supports_prefill=False)
    prefix = "```python\n"

    gen = backend.generate(ASK, GenerationParams(max_tokens=16, prefix=prefix))

    assert gen.text.startswith(prefix)
    sent = faults.bodies[-1]
    assert "continue_final_message" not in sent
    assert sent["messages"][-1]["role"] == "user"
    assert sent["messages"][-1]["content"].endswith(f"Start your answer with:\n{prefix}")


def test_an_echoed_prefix_is_not_doubled():
    from inference.backends.openai_backend import _without_echo

    assert "".join(_without_echo(iter(["``", "`py", "thon\nx = 1"]), "```python\n")) == "x = 1"
    assert "".join(_without_echo(iter(["x = ", "1"]), "```python\n")) == "x = 1"
    assert "".join(_without_echo(iter(["``"]), "```python\n")) == ""


@pytest.mark.model
def test_list_models(server):
    assert make_backend(server).list_models() == [SERVED]


# ---------------------------------------------------------------------- retries


@pytest.mark.model
def test_two_503s_then_success(server, faults):
    faults.fail(2, status=503)
    backend = make_backend(server, max_retries=3)

    gen = backend.generate(ASK, GenerationParams(max_tokens=8))

    assert gen.text.strip()
    assert faults.chat_requests == 3
    first, second = (b - a for a, b in zip(faults.arrivals, faults.arrivals[1:]))
    assert 0 < first < second < 5, (first, second)  # backs off, and not for long


@pytest.mark.model
def test_429_retry_after_is_honoured(server, faults):
    faults.fail(1, status=429, retry_after="1")
    backend = make_backend(server, max_retries=2)

    gen = backend.generate(ASK, GenerationParams(max_tokens=8))

    assert gen.text.strip()
    assert faults.chat_requests == 2
    waited = faults.arrivals[1] - faults.arrivals[0]
    assert waited >= 0.95, f"retried after {waited:.2f} s despite Retry-After: 1"


@pytest.mark.model
def test_a_retry_after_past_two_minutes_hands_the_job_back_at_once(server, faults):
    """The worker does not sit on a job for longer than two minutes: the error is retryable,
    so the job goes back to the queue (with the queue's own wait)."""
    faults.fail(1, status=429, retry_after="600")
    backend = make_backend(server, max_retries=2)

    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.generate(ASK, SHORT)

    assert time.monotonic() - started < 10
    assert caught.value.retryable and "with no retries" in str(caught.value)
    assert faults.chat_requests == 1


@pytest.mark.model
def test_gives_up_after_max_retries(server, faults):
    faults.fail(10, status=503)
    backend = make_backend(server, max_retries=2)

    with pytest.raises(BackendError) as caught:
        backend.generate(ASK, GenerationParams(max_tokens=16))

    assert caught.value.retryable
    assert faults.chat_requests == 3
    assert server in str(caught.value) and "503" in str(caught.value)


@pytest.mark.model
def test_timeouts_are_retried_then_reported(server, faults):
    faults.delay_seconds = 2.0
    backend = make_backend(server, max_retries=1, timeout_seconds=0.3)

    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        backend.generate(ASK, GenerationParams(max_tokens=16))

    assert time.monotonic() - started < 2.0
    assert caught.value.retryable and "timeout" in str(caught.value)
    assert faults.chat_requests == 2


@pytest.mark.model
def test_a_stream_that_breaks_before_its_first_token_is_asked_again(server, faults):
    """The openai client cannot retry a stream that opened; the backend does, while nothing
    has been passed on yet."""
    backend = make_backend(server, max_retries=2)
    clean = backend.generate(ASK, SHORT).text
    faults.arrivals.clear()
    faults.break_stream(1, after_pieces=0)

    gen = backend.generate(ASK, SHORT)

    assert faults.chat_requests == 2
    assert gen.text == clean


@pytest.mark.model
def test_a_stream_that_breaks_after_tokens_fails_without_repeating_them(server, faults):
    backend = make_backend(server, max_retries=2)
    clean = list(backend.stream(ASK, SHORT))
    assert len(clean) > 2
    faults.arrivals.clear()
    faults.break_stream(1, after_pieces=2)

    seen: list[str] = []
    with pytest.raises(BackendError) as caught:
        for piece in backend.stream(ASK, SHORT):
            seen.append(piece)

    assert caught.value.retryable and "failed mid-answer" in str(caught.value)
    assert faults.chat_requests == 1  # not asked again: the pieces cannot be taken back
    assert seen == clean[:2]
    assert list(backend.stream(ASK, SHORT)) == clean  # the next request is answered whole


def test_server_down_fails_fast_and_names_the_url(caplog):
    url = closed_port_url()
    backend = make_backend(url, max_retries=2)

    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        with pytest.raises(BackendError) as caught:
            backend.generate(ASK, GenerationParams(max_tokens=16))

    assert time.monotonic() - started < 5
    assert caught.value.retryable
    assert str(caught.value).startswith(
        f"cannot reach the model server at {url}: connection refused (is vLLM running?)"
    )
    # bounded: max_retries retries (the openai client logs each), then the error
    retries = [r for r in caplog.records if "retry" in r.getMessage() and "of 2" in r.getMessage()]
    assert len(retries) == 2, [r.getMessage() for r in caplog.records]


def test_stream_consumer_sees_the_error_before_any_text():
    backend = make_backend(closed_port_url(), max_retries=0)
    with pytest.raises(BackendError, match="connection refused"):
        next(backend.stream(ASK, SHORT))


# ---------------------------------------------------------------------- client errors


@pytest.mark.model
def test_prompt_too_long_is_context_too_long(server, faults):
    backend = make_backend(server)
    huge = [Message("user", "Please refactor this code. " + "x = compute(y) + 1\n" * 900)]

    with pytest.raises(ContextTooLong) as caught:
        backend.generate(huge, GenerationParams(max_tokens=16))

    assert "maximum context length is 2048 tokens" in str(caught.value)
    assert not caught.value.retryable
    assert faults.chat_requests == 1  # not retried


@pytest.mark.model
def test_max_tokens_past_the_context_is_context_too_long(server, faults):
    faults.max_model_len = 64
    with pytest.raises(ContextTooLong, match="maximum context length is 64 tokens"):
        list(make_backend(server).stream(ASK, GenerationParams(max_tokens=48)))


@pytest.mark.model
def test_other_4xx_is_not_retried(server, faults):
    faults.fail(1, status=422)
    with pytest.raises(BackendError) as caught:
        make_backend(server).generate(ASK, SHORT)
    assert not caught.value.retryable and "injected failure" in str(caught.value)
    assert faults.chat_requests == 1


@pytest.mark.model
def test_unknown_model_lists_the_served_ones(server, faults):
    backend = make_backend(server)

    with pytest.raises(BackendError) as caught:
        backend.generate(ASK, GenerationParams(max_tokens=16, model="no-such-adapter"))

    message = str(caught.value)
    assert "'no-such-adapter'" in message and f"it serves: {SERVED}" in message
    assert not caught.value.retryable
    assert faults.chat_requests == 1


# ---------------------------------------------------------------------- secrets


@pytest.mark.model
def test_the_api_key_is_never_logged(server, faults, caplog):
    secret = "sk-test-do-not-log-4711"
    faults.fail(2, status=503)
    backend = make_backend(server, api_key=secret, max_retries=1)

    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BackendError) as gave_up:
            backend.generate(ASK, GenerationParams(max_tokens=8))
        with pytest.raises(BackendError) as unknown:
            backend.generate(ASK, GenerationParams(max_tokens=8, model="nope"))

    assert any("retry 1 of 1" in r.getMessage() for r in caplog.records)  # retries are logged
    assert secret not in caplog.text  # ... without the key
    assert secret not in repr(backend)
    assert secret not in str(gave_up.value) and secret not in str(unknown.value)


def test_count_tokens():
    settings = BackendSettings(kind="openai")
    assert OpenAIBackend(settings).count_tokens("x" * 300) == 100
    assert OpenAIBackend(settings, tokenizer_counter=lambda t: 7).count_tokens("anything") == 7


def test_a_choice_goes_to_the_server_as_structured_outputs(server, faults):
    from inference.structured import choose

    capital = [Message("user", "What is the capital city of France? Answer with the city name.")]
    with make_backend(server) as backend:
        assert choose(backend, capital, ["Banana", "Paris", "Seventeen"]) == "Paris"
    body = faults.bodies[-1]
    assert body["structured_outputs"] == {"choice": ["Banana", "Paris", "Seventeen"]}
    assert not any(key.startswith("guided_") for key in body)
