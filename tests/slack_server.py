"""A local Slack Web API server (real HTTP on 127.0.0.1) for tests: Slack itself cannot run here.

It answers the methods codeloop calls the way Slack does (`{"ok": true, ...}`), records
every call, and can answer `ratelimited` (HTTP 429 with Retry-After) on demand. Point
`settings.slack.api_url` at `server.api_url`.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

BOT_USER = "UCODELOOP"
BOT_ID = "BCODELOOP"
TEAM = "T0CODELOOP"


@dataclass
class Call:
    method: str
    params: dict
    token: str | None
    status: int  # what the server answered
    response: dict  # and the body it answered with


class SlackAPIServer:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._ratelimits: dict[str, list[int]] = {}  # method → [remaining 429s, retry-after]
        self.socket_url: str | None = None  # what apps.connections.open answers
        self.not_in: set[str] = set()  # channels the bot is not a member of
        self.down = False  # answer every call 503, as when Slack's Web API is unreachable
        self.hooks_url = ""  # set below: where slash-command response_urls point
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                method = self.path.rsplit("/", 1)[-1]
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if "json" in (self.headers.get("Content-Type") or ""):
                    params = json.loads(raw or "{}")
                else:
                    params = {k: v[0] for k, v in parse_qs(raw).items()}
                for key in ("blocks", "attachments"):
                    if isinstance(params.get(key), str):
                        params[key] = json.loads(params[key])
                auth = self.headers.get("Authorization") or ""
                token = auth.removeprefix("Bearer ") or params.get("token")
                status, headers, body = server._answer(method, params)
                with server._lock:
                    server.calls.append(Call(method, params, token, status, body))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api/"
        self.hooks_url = f"http://127.0.0.1:{self.port}/hooks/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -------------------------------------------------------------- control

    def start(self) -> SlackAPIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ratelimit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next `times` calls of `method` with 429 ratelimited."""
        with self._lock:
            self._ratelimits[method] = [times, retry_after]

    def of(self, method: str, ok_only: bool = True) -> list[Call]:
        with self._lock:
            return [c for c in self.calls
                    if c.method == method and (c.status == 200 or not ok_only)]

    def texts(self, method: str = "chat.postMessage") -> list[str]:
        return [c.params.get("text", "") for c in self.of(method)]

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "a Slack call"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate(self)
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; calls: "
                             f"{[(c.method, c.params.get('text')) for c in self.calls]}")

    # -------------------------------------------------------------- answers

    def _answer(self, method: str, params: dict) -> tuple[int, dict, dict]:
        if self.down:
            return 503, {}, {"ok": False, "error": "service_unavailable"}
        with self._lock:
            limit = self._ratelimits.get(method)
            if limit and limit[0] > 0:
                limit[0] -= 1
                return 429, {"Retry-After": str(limit[1])}, {"ok": False, "error": "ratelimited"}
        if params.get("channel") in self.not_in and method.startswith("chat."):
            return 200, {}, {"ok": False, "error": "not_in_channel"}
        if method.startswith("response-"):  # a slash command's response_url
            return 200, {}, {"ok": True}
        if method == "auth.test":
            return 200, {}, {"ok": True, "url": "https://codeloop-test.slack.com/", "team": "test",
                             "user": "codeloop", "team_id": TEAM, "user_id": BOT_USER,
                             "bot_id": BOT_ID, "is_enterprise_install": False}
        if method in ("chat.postMessage", "chat.update"):
            channel = params.get("channel")
            if not channel:
                return 200, {}, {"ok": False, "error": "channel_not_found"}
            if method == "chat.update" and not params.get("ts"):
                return 200, {}, {"ok": False, "error": "message_not_found"}
            ts = params.get("ts") or f"{1700000000 + next(self._ts)}.000100"
            return 200, {}, {"ok": True, "channel": channel, "ts": ts,
                             "message": {"text": params.get("text"), "ts": ts, "user": BOT_USER,
                                         "bot_id": BOT_ID}}
        if method == "chat.postEphemeral":
            return 200, {}, {"ok": True, "message_ts": f"{1700000000 + next(self._ts)}.000200"}
        if method == "reactions.add":
            return 200, {}, {"ok": True}
        if method == "apps.connections.open":
            if self.socket_url is None:
                return 200, {}, {"ok": False, "error": "not_allowed_token_type"}
            return 200, {}, {"ok": True, "url": self.socket_url}
        return 200, {}, {"ok": False, "error": "unknown_method"}


class SocketModeServer:
    """A local Socket Mode websocket endpoint: says hello, sends envelopes, collects acks.

    Give `server.url` to SlackAPIServer.socket_url: `apps.connections.open` hands it to the
    client, as Slack does with its wss:// URL.
    """

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.acks: list[dict] = []
        self.connected = threading.Event()
        self._outbox: list[dict] = []
        self._cond = threading.Condition()
        self._server = serve(self._session, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self._server.socket.getsockname()[1]}/link"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> SocketModeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def send(self, envelope: dict) -> None:
        with self._cond:
            self._outbox.append(envelope)
            self._cond.notify_all()

    def _session(self, conn) -> None:
        conn.send(json.dumps({"type": "hello", "num_connections": 1,
                              "debug_info": {"host": "local"}}))
        self.connected.set()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._outbox, timeout=0.1)
                outgoing, self._outbox = self._outbox, []
            try:
                for envelope in outgoing:
                    conn.send(json.dumps(envelope))
                try:
                    raw = conn.recv(timeout=0.05)
                except TimeoutError:
                    continue
            except Exception:  # noqa: BLE001 - the client went away
                return
            with self._cond:
                self.acks.append(json.loads(raw))
