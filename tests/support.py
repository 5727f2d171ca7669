"""Helpers and constants the tests share: settings for a temporary home, the environment of a
`codeloop` subprocess, git output, polling, and the session's vLLM server. Tests import them
from here; the pytest fixtures that use them are registered in conftest.py (a test module
never imports conftest.py, which pytest loads under its own name)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import TypeVar

from bot import vllm
from bot.settings import (
    BackendSettings,
    EmbeddedSettings,
    QueueSettings,
    SandboxSettings,
    Settings,
    StoreSettings,
)
from bot.store.db import Store

T = TypeVar("T")

POSTGRES_URL = os.environ.get(
    "CODELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def model_cache_dir() -> Path:
    return Path(os.environ.get("CODELOOP_TEST_MODEL_CACHE", Path.home() / ".cache/codeloop/models"))


def make_settings(home: Path, db_url: str | None = None, **overrides) -> Settings:
    sandbox = overrides.pop("sandbox", SandboxSettings(timeout_seconds=120))
    return Settings(
        home=home,
        store=StoreSettings(url=db_url),
        queue=overrides.pop("queue", QueueSettings(lease_seconds=30)),
        backend=overrides.pop("backend", BackendSettings(max_new_tokens=160)),
        embedded=EmbeddedSettings(cache_dir=model_cache_dir()),
        sandbox=sandbox,
        **overrides,
    )


def git_out(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def cli_env(settings: Settings) -> dict[str, str]:
    """Environment for a `codeloop` subprocess that uses these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODELOOP_")}
    env.update(
        CODELOOP_HOME=str(settings.home),
        CODELOOP_EMBEDDED__CACHE_DIR=str(settings.embedded.cache_dir),
        CODELOOP_QUEUE__LEASE_SECONDS=str(settings.queue.lease_seconds),
        CODELOOP_BACKEND__MAX_NEW_TOKENS=str(settings.backend.max_new_tokens),
        PYTHONUNBUFFERED="1",
    )
    if settings.store.url:
        env["CODELOOP_STORE__URL"] = settings.store.url
    return env


def poll(predicate: Callable[[], T], timeout: float, interval: float = 0.2) -> T:
    """Calls predicate until it returns something true or timeout seconds have passed;
    returns its last value (false on timeout, for the caller to assert with its own message)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "the condition",
             interval: float = 0.2) -> T:
    """poll, failing the test when the time runs out."""
    value = poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out waiting for {what}")
    return value


def rows(store: Store, statement) -> list:
    """What a select returns, read in a session of its own (for polling the store from a test
    while a worker process writes to it)."""
    with store.session() as s:
        return list(s.scalars(statement))


# ---------------------------------------------------------------- vLLM (tests/test_vllm.py)

SERVED = "smollm2-135m-instruct"  # the embedded model's served name
START_TIMEOUT = 900  # seconds; a cold start on 2 cores takes a few minutes at most


@dataclass
class Server:
    base_url: str  # ends in /v1
    process: Popen
    log_path: Path
    start_seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMPool:
    """One vLLM server for the whole test session (a start costs a minute or more on 2 cores),
    started on first use and started again if a test killed it."""

    def __init__(self, home: Path, model_dir: Path):
        self.home, self.model_dir = home, model_dir
        self.server: Server | None = None

    def get(self) -> Server:
        if self.server is not None and self.server.process.poll() is None:
            return self.server
        vllm.ensure_venv()  # builds it the first time; raises (a test error) if it cannot
        settings = make_settings(self.home, backend=BackendSettings(kind="openai", model=SERVED))
        port = free_port()
        started = time.monotonic()
        proc = vllm.serve(settings, model_dir=self.model_dir, port=port)
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            vllm.wait_healthy(base_url, START_TIMEOUT, process=proc)
        except BaseException:
            vllm.stop(proc)
            raise
        self.server = Server(base_url, proc, proc.log_path, time.monotonic() - started)
        print(f"\nvLLM healthy after {self.server.start_seconds:.1f} s (log {proc.log_path})")
        return self.server

    def close(self) -> None:
        if self.server is not None:
            vllm.stop(self.server.process)
