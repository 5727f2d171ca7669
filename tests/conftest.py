"""Shared fixtures: real databases (SQLite file, PostgreSQL at 127.0.0.1), the real embedded
model, real git repositories in temporary directories. The helpers they use, and that tests
import, live in tests/support.py."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from bot.demo import make_sample_repo
from bot.settings import Settings
from tests.support import POSTGRES_URL, VLLMPool, make_settings, model_cache_dir


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


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return make_settings(tmp_path / "home", db_url)


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "home")


@pytest.fixture
def sample_repo(tmp_path) -> Path:
    return make_sample_repo(tmp_path / "repo")


# ---------------------------------------------------------------- vLLM (tests/test_vllm.py)


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
