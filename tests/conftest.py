"""Shared fixtures: real databases (SQLite file, PostgreSQL at 127.0.0.1), the real embedded
model, real git repositories in temporary directories."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import pytest

from bot import vllm
from bot.demo import make_sample_repo
from bot.settings import (
    BackendSettings,
    EmbeddedSettings,
    QueueSettings,
    SandboxSettings,
    Settings,
    StoreSettings,
)

POSTGRES_URL = os.environ.get(
    "CODELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def model_cache_dir() -> Path:
    return Path(os.environ.get("CODELOOP_TEST_MODEL_CACHE", Path.home() / ".cache/codeloop/models"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from inference.backends.embedded import ensure_converted

    path, _ = ensure_converted(model_cache_dir())
    return path


@pytest.fixture(scope="session")
def embedded_backend(embedded_model_dir):
    from inference.backends.embedded import EMBEDDED_MODEL_NAME
    from inference.backends.transformers_backend import TransformersBackend

    return TransformersBackend(embedded_model_dir, model_name=EMBEDDED_MODEL_NAME)


def _postgres_admin_url() -> str:
    return POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"codeloop_t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(_postgres_admin_url(), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = POSTGRES_URL.rpartition("/")
    yield f"{base}/{name}"
    with psycopg.connect(_postgres_admin_url(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'codeloop.db'}"
    return request.getfixturevalue("postgres_url")


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


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return make_settings(tmp_path / "home", db_url)


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "home")


@pytest.fixture
def sample_repo(tmp_path) -> Path:
    return make_sample_repo(tmp_path / "repo")


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


@pytest.fixture(scope="session")
def vllm_pool(tmp_path_factory, embedded_model_dir):
    pool = VLLMPool(tmp_path_factory.mktemp("vllm-home"), embedded_model_dir)
    yield pool
    pool.close()


@pytest.fixture
def vllm_server(vllm_pool):
    if os.environ.get("CODELOOP_SKIP_VLLM") == "1":
        pytest.skip("CODELOOP_SKIP_VLLM=1")
    return vllm_pool.get()
