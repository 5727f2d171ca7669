"""`codeloop doctor` against a broken set-up: one clear line per problem, non-zero exit.

Slack is a tiny Slack Web API server on loopback (answers `auth.test`, as Slack does for a
revoked token, with invalid_auth; the GitHub part answers `GET /user` for a token). The
model server is a closed port. The doctor runs as a real `codeloop doctor` subprocess.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bot.github.events import EVENTS
from tests.support import cli_env, make_settings

SLACK_TOKEN = "xoxb-1111-2222-wrongtoken"


class _PeerHandler(BaseHTTPRequestHandler):
    """Slack's auth.test (token check) and GitHub's GET /user, the two calls doctor makes."""

    seen: list[str] = []

    def _json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.seen.append(f"POST {self.path} {self.headers.get('Authorization', '')}")
        if self.path.rstrip("/").endswith("/auth.test"):
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token == "xoxb-good":
                self._json(200, {"ok": True, "user": "codeloop", "team": "Acme"})
            else:
                self._json(200, {"ok": False, "error": "invalid_auth"})
            return
        self._json(404, {"ok": False, "error": "unknown_method"})

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(f"GET {self.path}")
        if self.path == "/user":
            self._json(200, {"login": "codeloop-bot", "id": 1, "type": "User"},
                       {"X-OAuth-Scopes": "repo"})
            return
        self._json(404, {"message": "Not Found"})

    def log_message(self, *args) -> None:
        pass


@contextmanager
def peer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PeerHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_doctor_names_each_problem_on_one_line_and_fails(tmp_path):
    settings = make_settings(tmp_path / "home")
    env = cli_env(settings)
    with peer() as url:
        env.update(
            CODELOOP_SLACK__BOT_TOKEN=SLACK_TOKEN,
            CODELOOP_SLACK__SIGNING_SECRET="signing-secret-value",
            CODELOOP_SLACK__API_URL=f"{url}/api/",
            CODELOOP_BACKEND__KIND="openai",
            CODELOOP_BACKEND__BASE_URL=f"http://127.0.0.1:{closed_port()}/v1",
            CODELOOP_FORGE__KIND="github",
            CODELOOP_GITHUB__TOKEN="ghp_doctortesttoken",
            CODELOOP_GITHUB__API_URL=url,
        )
        done = subprocess.run([sys.executable, "-m", "bot.cli", "migrate"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = subprocess.run([sys.executable, "-m", "bot.cli", "doctor", "--timeout", "3"],
                                env=env, capture_output=True, text=True, timeout=120)
        seen = list(_PeerHandler.seen)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    lines = out.splitlines()
    fails = [line for line in lines if line.startswith("FAIL")]

    def line_for(name: str) -> str:
        found = [line for line in lines if line.split(":")[0].split(None, 1)[-1] == name]
        assert len(found) == 1, out
        return found[0]

    slack = line_for("slack token")
    assert slack.startswith("FAIL") and "invalid_auth" in slack
    assert "CODELOOP_SLACK__BOT_TOKEN" in slack
    backend = line_for("backend")
    assert backend.startswith("FAIL") and "cannot reach the model server" in backend
    assert "CODELOOP_BACKEND__BASE_URL" in backend
    secret = line_for("github webhook secret")
    assert secret.startswith("FAIL") and "CODELOOP_GITHUB__WEBHOOK_SECRET is not set" in secret
    assert len(fails) == 3, out  # nothing else is broken: database, queue, token, signing secret
    assert line_for("database").startswith("OK")
    assert line_for("slack signing secret").startswith("OK")
    assert line_for("github token").startswith("OK") and "codeloop-bot" in out
    assert lines[-1] == "3 problem(s) to fix"
    # The token went to Slack (auth.test), and never into the output.
    assert any("auth.test" in s and SLACK_TOKEN in s for s in seen)
    assert SLACK_TOKEN not in out + result.stderr


def test_doctor_passes_a_sound_local_setup(tmp_path):
    settings = make_settings(tmp_path / "home")
    env = cli_env(settings)
    subprocess.run([sys.executable, "-m", "bot.cli", "migrate"], env=env, check=True,
                   capture_output=True, timeout=120)
    with peer() as url:
        env.update(CODELOOP_SLACK__BOT_TOKEN="xoxb-good", CODELOOP_SLACK__API_URL=f"{url}/api/",
                   CODELOOP_SLACK__SIGNING_SECRET="s3cret-signing")
        result = subprocess.run([sys.executable, "-m", "bot.cli", "doctor"], env=env,
                                capture_output=True, text=True, timeout=120)
    assert "OK    slack token: bot codeloop in workspace Acme" in result.stdout
    assert "OK    sandbox: self-test: 11/11 escape attempts blocked" in result.stdout
    for attempt in ("read a file outside the copy", "read another process's environment",
                    "write outside the copy", "connect to a Unix socket", "open a TCP connection",
                    "leave a process behind"):
        assert f"blocked: {attempt} (" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("FAIL")], \
        result.stdout
    assert result.returncode == 0


class _AppHandler(BaseHTTPRequestHandler):
    """GitHub's `GET /app` and `GET /app/installations`, as an App's JWT sees them."""

    permissions: dict = {}
    installations: list = []

    def do_GET(self) -> None:  # noqa: N802
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            body, status = {"message": "A JSON web token could not be decoded"}, 401
        elif self.path.startswith("/app/installations"):
            body, status = self.installations, 200
        elif self.path == "/app":
            body, status = {"id": 7, "slug": "codeloop-test", "name": "codeloop-test",
                            "permissions": self.permissions,
                            "events": sorted(EVENTS)}, 200
        else:
            body, status = {"message": "Not Found"}, 404
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_github_app_permissions_and_installation(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from pydantic import SecretStr

    from bot.github.check import check_access as check_github_access
    from bot.settings import ForgeSettings, GitHubSettings

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AppHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = make_settings(
        tmp_path / "home", forge=ForgeSettings(kind="github"),
        github=GitHubSettings(app_id=7, private_key=SecretStr(key),
                              api_url=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        _AppHandler.permissions = {"contents": "write", "issues": "read", "metadata": "read",
                                   "pull_requests": "write"}
        _AppHandler.installations = [{"id": 1, "app_id": 7, "target_type": "Organization",
                                     "account": {"login": "acme"}}]
        short = check_github_access(settings)
        assert short.status == "fail" and "issues: write" in short.message
        assert "contents" not in short.message

        _AppHandler.permissions["issues"] = "write"
        _AppHandler.installations = []
        nowhere = check_github_access(settings)
        assert nowhere.status == "fail" and "installed nowhere" in nowhere.message

        _AppHandler.installations = [{"id": 1, "app_id": 7, "target_type": "Organization",
                                     "account": {"login": "acme"}}]
        good = check_github_access(settings)
        assert good.status == "ok" and "installed for acme" in good.message
    finally:
        server.shutdown()
        server.server_close()


def test_backend_check_names_a_promoted_adapter_that_is_not_loaded(tmp_path):
    from bot.doctor import check_backend
    from bot.settings import BackendSettings
    from bot.store.db import Store
    from bot.store.models import ModelVersion
    from tests.fakes import ScriptedBackend
    from tests.openai_server import serve_openai

    with serve_openai(ScriptedBackend("x"), served_name="smollm2-135m-instruct") as base_url:
        settings = make_settings(tmp_path / "home",
                                 backend=BackendSettings(kind="openai", base_url=base_url))
        store = Store(settings.database_url)
        assert check_backend(settings).status == "ok"
        with store.session() as s:
            s.add(ModelVersion(name="acme-v2", base_model="smollm2-135m-instruct",
                               adapter_path="/data/adapters/acme-v2", status="active"))
        missing = check_backend(settings)
        assert missing.status == "fail" and "acme-v2" in missing.message
        assert "load_lora_adapter" in missing.message
        wrong = make_settings(tmp_path / "home", backend=BackendSettings(
            kind="openai", base_url=base_url, model="qwen-coder"))
        other = check_backend(wrong)
        assert other.status == "fail" and "does not serve 'qwen-coder'" in other.message
