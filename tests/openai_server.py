"""An OpenAI-compatible HTTP server on loopback, for tests, in front of a real codeloop Backend.

It speaks the slice of vLLM's OpenAI API that codeloop uses -- `GET /v1/models` and
`POST /v1/chat/completions` (plain JSON or server-sent events, the usage chunk with
`stream_options.include_usage`, vLLM's `continue_final_message` / `add_generation_prompt`
extras, vLLM's error bodies) -- and generates with the Backend it is given (the embedded
transformers model in the tests), so only the port is fake: the text is real.

`Faults` are the knobs tests turn: fail the next N chat requests with a status (and a
Retry-After header), delay answers, lower the context limit. It also records every chat
request that arrived, so tests can count attempts.

    faults = Faults()
    with serve_openai(backend, served_name="smollm2", faults=faults) as base_url:
        faults.fail(2, status=503)
        ...  # OpenAI(base_url=base_url, ...) sees two 503s, then a real answer
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bot.ports import Backend, ContextTooLong, Generation, GenerationParams, Message

_MESSAGE_OVERHEAD_TOKENS = 4  # role markers a chat template adds around each message


@dataclass
class Faults:
    """Fault injection for `/v1/chat/completions`, and a record of what arrived there.

    Safe to change from the test's thread while the server runs.
    """

    fail_next: int = 0  # answer the next N chat requests with `fail_status` instead
    fail_status: int = 503
    retry_after: str | None = None  # Retry-After header sent with the failures
    delay_seconds: float = 0.0  # wait this long before answering each chat request
    max_model_len: int | None = None  # context limit (default: the backend's context_tokens)
    break_streams: int = 0  # break the next N streamed answers with vLLM's error event ...
    break_after: int = 0  # ... after this many content pieces
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each chat request
    bodies: list[dict] = field(default_factory=list)  # JSON body of each chat request
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, times: int, status: int = 503, *, retry_after: str | None = None) -> None:
        with self.lock:
            self.fail_next, self.fail_status, self.retry_after = times, status, retry_after

    def break_stream(self, times: int, *, after_pieces: int) -> None:
        with self.lock:
            self.break_streams, self.break_after = times, after_pieces

    def _breaks(self) -> int | None:
        """Content pieces this streamed answer gets before it breaks (None: it does not)."""
        with self.lock:
            if self.break_streams > 0:
                self.break_streams -= 1
                return self.break_after
            return None

    @property
    def chat_requests(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def _arrived(self, body: dict) -> tuple[int, str | None] | None:
        """Record a request; return (status, retry_after) when it is to fail."""
        with self.lock:
            self.arrivals.append(time.monotonic())
            self.bodies.append(body)
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status, self.retry_after
            return None


# ---------------------------------------------------------------------- the app


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}


def _error(status: int, message: str, *, headers: dict | None = None) -> JSONResponse:
    """vLLM's error body: {"error": {"message", "type", "param", "code"}}."""
    kind = _ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BadRequest(Exception):
    pass


def _text_of(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise _BadRequest(f"unsupported message content: {type(content).__name__}")


def _parse(body: dict) -> tuple[list[Message], GenerationParams, bool, bool]:
    """(messages, params, stream, include_usage) from a chat-completions body, as vLLM checks it."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("`messages` must be a non-empty list")
    try:
        messages = [Message(role=str(m["role"]), content=_text_of(m.get("content"))) for m in raw]
    except (KeyError, TypeError) as exc:
        raise _BadRequest(f"malformed message: {exc}") from exc
    stream = bool(body.get("stream"))
    if body.get("stream_options") and not stream:
        raise _BadRequest("Stream options can only be defined when `stream=True`.")
    continue_final = bool(body.get("continue_final_message", False))
    if continue_final and body.get("add_generation_prompt", True):
        raise _BadRequest(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    prefix = ""
    if continue_final:
        if messages[-1].role != "assistant":
            raise _BadRequest(
                "continue_final_message is set but the final message is not an assistant message"
            )
        prefix, messages = messages[-1].content, messages[:-1]
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if len(stop) > 4:  # vLLM's protocol model (and OpenAI's API) take at most four
        raise _BadRequest(f"stop: List should have at most 4 items after validation, not {len(stop)}")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    temperature = body.get("temperature")
    structured = body.get("structured_outputs") or {}
    if not isinstance(structured, dict):
        raise _BadRequest("`structured_outputs` must be an object")
    if any(k.startswith("guided_") for k in body):
        raise _BadRequest("guided_* fields were removed from vLLM; use structured_outputs")
    choice = structured.get("choice") or ()
    if choice and (not isinstance(choice, list) or not all(isinstance(c, str) for c in choice)):
        raise _BadRequest("structured_outputs.choice must be a list of strings")
    params = GenerationParams(
        max_tokens=int(max_tokens),
        temperature=1.0 if temperature is None else float(temperature),  # vLLM's default
        stop=tuple(stop),
        prefix=prefix,
        choice=tuple(choice),
        regex=structured.get("regex"),
    )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return messages, params, stream, include_usage


def _context_problem(
    backend: Backend, messages: list[Message], params: GenerationParams, limit: int | None
) -> str | None:
    """vLLM's words when the prompt (or prompt + max_tokens) does not fit `limit`."""
    if limit is None:
        return None
    prompt = sum(backend.count_tokens(m.content) + _MESSAGE_OVERHEAD_TOKENS for m in messages)
    prompt += backend.count_tokens(params.prefix)
    if prompt >= limit:
        return (
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{prompt} input tokens. Please reduce the length of the input messages."
        )
    if prompt + params.max_tokens > limit:
        return (
            f"'max_tokens' or 'max_completion_tokens' is too large: {params.max_tokens}. This "
            f"model's maximum context length is {limit} tokens and your request has {prompt} "
            f"input tokens ({params.max_tokens} > {limit} - {prompt})."
        )
    return None


class _StopCut:
    """Cuts streamed text at the first stop string, holding back what may start one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[: min(hits)], "", True
            return out
        if len(self.held) <= self.keep:
            return ""
        cut = len(self.held) - self.keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


def _generate_in_thread(
    backend: Backend, messages: list[Message], params: GenerationParams
) -> queue.Queue:
    """Run backend.generate on a thread; its events arrive on the queue:
    ("text", str) ..., then ("done", Generation) or ("error", exception)."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            gen = backend.generate(messages, params, on_text=lambda t: events.put(("text", t)))
            events.put(("done", gen))
        except BaseException as exc:  # noqa: BLE001 - reported to the request
            events.put(("error", exc))

    threading.Thread(target=work, name="openai-server-generate", daemon=True).start()
    return events


def _usage(gen: Generation) -> dict:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def build_app(
    backend: Backend, *, served_name: str, faults: Faults, context_tokens: int | None
) -> Starlette:
    def limit() -> int | None:
        return faults.max_model_len or context_tokens

    def context_error(exc: ContextTooLong) -> JSONResponse:
        size = limit()
        known = f"This model's maximum context length is {size} tokens. " if size else ""
        return _error(400, f"{known}However, your request is too long: {exc}")

    async def models(request: Request) -> Response:
        card = {
            "id": served_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "codeloop",
            "root": served_name,
            "max_model_len": limit(),
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        failure = faults._arrived(body)
        delay = faults.delay_seconds
        if delay > 0:
            until = time.monotonic() + delay
            while time.monotonic() < until:
                if await request.is_disconnected():
                    return Response(status_code=499)
                await asyncio.sleep(0.02)
        if failure is not None:
            status, retry_after = failure
            headers = {"Retry-After": retry_after} if retry_after is not None else None
            return _error(status, f"injected failure (HTTP {status})", headers=headers)

        model = body.get("model") or served_name
        if model != served_name:
            return _error(404, f"The model `{model}` does not exist.")
        try:
            messages, params, stream, include_usage = _parse(body)
        except _BadRequest as exc:
            return _error(400, str(exc))
        problem = await run_in_threadpool(_context_problem, backend, messages, params, limit())
        if problem:
            return _error(400, problem)

        n = body.get("n") or 1
        if not isinstance(n, int) or n < 1:
            return _error(400, "`n` must be a positive integer")
        if n > 1:
            if stream:
                return _error(400, "this test server answers n > 1 without streaming only")
            return await run_in_threadpool(_n_answers, backend, messages, params, n, model)

        events = _generate_in_thread(backend, messages, params)
        if not stream:
            pieces = []
            while True:
                kind, value = await run_in_threadpool(events.get)
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    if isinstance(value, ContextTooLong):
                        return context_error(value)
                    return _error(500, f"generation failed: {value}")
                else:
                    break
            gen: Generation = value
            cut = _StopCut(params.stop)
            text = cut.feed("".join(pieces)) + cut.flush()
            finish = "stop" if cut.stopped else gen.finish_reason
            return JSONResponse(
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": _usage(gen),
                }
            )

        # Errors before the first token (a prompt too long) are HTTP errors, as in vLLM.
        first = await run_in_threadpool(events.get)
        if first[0] == "error":
            if isinstance(first[1], ContextTooLong):
                return context_error(first[1])
            return _error(500, f"generation failed: {first[1]}")
        return StreamingResponse(
            _sse(first, events, model=model, stop=params.stop, include_usage=include_usage,
                 break_after=faults._breaks()),
            media_type="text/event-stream",
        )

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ]
    )


def _n_answers(backend: Backend, messages, params: GenerationParams, n: int,
               model: str) -> Response:
    """`n` choices for one prompt, as vLLM returns them (one usage for the whole request)."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index in range(n):
        try:
            gen = backend.generate(messages, params)
        except ContextTooLong as exc:
            return _error(400, str(exc))
        cut = _StopCut(params.stop)
        text = cut.feed(gen.text[len(params.prefix):]) + cut.flush()
        choices.append({"index": index, "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop" if cut.stopped else gen.finish_reason})
        prompt_tokens = gen.prompt_tokens
        completion_tokens += gen.completion_tokens
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


def _sse(first, events: queue.Queue, *, model: str, stop, include_usage: bool,
         break_after: int | None = None) -> Iterator[bytes]:
    """Server-sent events, vLLM's shape: a role chunk, content chunks, a finish chunk, the
    usage chunk (choices: []) when asked for, then [DONE]. Starlette runs this in a thread."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list, usage: dict | None = None) -> bytes:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n".encode()

    def delta(content: str) -> bytes:
        return chunk([{"index": 0, "delta": {"content": content}, "finish_reason": None}])

    def error_event(message: str) -> bytes:  # a mid-stream failure: vLLM sends an error event
        body = {"error": {"message": message, "type": "InternalServerError", "param": None,
                          "code": 500}}
        return f"data: {json.dumps(body)}\n\n".encode()

    sent = 0
    yield chunk(
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    )
    cut = _StopCut(tuple(stop))
    event = first
    while True:
        kind, value = event
        if kind == "text":
            out = cut.feed(value)
            if out and break_after is not None and sent >= break_after:
                yield error_event("injected failure (the stream broke)")
                return
            if out:
                sent += 1
                yield delta(out)
        elif kind == "error":
            yield error_event(f"generation failed: {value}")
            return
        else:
            gen: Generation = value
            break
        event = events.get()
    rest = cut.flush()
    if rest:
        yield delta(rest)
    finish = "stop" if cut.stopped else gen.finish_reason
    yield chunk([{"index": 0, "delta": {}, "finish_reason": finish}])
    if include_usage:
        yield chunk([], usage=_usage(gen))
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------- running it


@contextmanager
def serve_openai(
    backend: Backend,
    *,
    served_name: str,
    faults: Faults | None = None,
    context_tokens: int | None = None,
    port: int = 0,
) -> Iterator[str]:
    """Serve `backend` on 127.0.0.1 (`port`, or a free one) in a background thread; yield the
    base URL (ending in /v1). `context_tokens` defaults to the backend's `context_tokens`."""
    faults = faults if faults is not None else Faults()
    if context_tokens is None:
        context_tokens = getattr(backend, "context_tokens", None)
    app = build_app(backend, served_name=served_name, faults=faults, context_tokens=context_tokens)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="openai-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the test OpenAI server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
