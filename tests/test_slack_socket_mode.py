"""Socket Mode: the real slack_sdk Socket Mode client gets its websocket URL from
`apps.connections.open` on the local Slack Web API server and connects to a local websocket
endpoint; an event sent over it is acknowledged, stored once, and becomes a request."""

from __future__ import annotations

import time

from bot.demo import make_sample_repo
from tests import slack_signing as signing
from bot.slack.app import run_socket_mode
from bot.slack.handler import link_channel
from bot.store.models import Delivery, Request
from tests.support import make_settings
from tests.fakes import ScriptedBackend
from tests.slack_harness import ADMIN, ALICE, Harness, slack_settings
from tests.slack_server import SlackAPIServer, SocketModeServer


def test_an_event_over_socket_mode_is_acknowledged_stored_and_queued(tmp_path):
    import json

    repo = make_sample_repo(tmp_path / "repo")
    slack = SlackAPIServer().start()
    ws = SocketModeServer().start()
    slack.socket_url = ws.url
    settings = make_settings(tmp_path / "home", slack=slack_settings(slack.api_url))
    h = Harness(settings, slack, ScriptedBackend("no edit here")).start()
    handler = None
    try:
        link_channel(h.store, "CSOCK", str(repo), ADMIN)
        handler = run_socket_mode(settings, h.store, h.huey.codeloop_handle_delivery, block=False)
        assert ws.connected.wait(20), "the Socket Mode client never connected"
        opened = slack.of("apps.connections.open")
        assert opened and opened[0].token == "xapp-test-token"  # the app-level token

        body = json.loads(signing.event_body(
            {"type": "message", "channel": "CSOCK", "user": ALICE, "text": "Add a helper",
             "ts": "1800000000.000001", "channel_type": "channel"}, "EvSOCK"))
        for attempt in (1, 2):  # a redelivery over the socket: one row, one request
            ws.send({"envelope_id": f"env-{attempt}", "type": "events_api",
                     "accepts_response_payload": False, "retry_attempt": attempt - 1,
                     "payload": body})
        slack.wait_for(lambda s: [t for t in s.texts() if t.startswith("Queued as #1")],
                       what="queued reply")
        deadline = time.monotonic() + 10
        while len(ws.acks) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(a["envelope_id"] for a in ws.acks) == ["env-1", "env-2"]
        assert h.count(Delivery) == 1 and h.count(Request) == 1
        h.wait_job(h.requests()[0].jobs[0].id)
    finally:
        if handler is not None:
            handler.close()
        h.stop()
        ws.stop()
        slack.stop()


def test_codeloop_serve_socket_mode_takes_events_without_a_public_url(tmp_path):
    """`codeloop serve --socket-mode` as a real process: it connects to Slack's websocket,
    and a message sent over it is queued and answered in the thread."""
    import json
    import signal
    import socket
    import subprocess
    import sys

    from bot.store.db import Store
    from tests.support import cli_env

    repo = make_sample_repo(tmp_path / "repo")
    slack = SlackAPIServer().start()
    ws = SocketModeServer().start()
    slack.socket_url = ws.url
    settings = make_settings(tmp_path / "home", slack=slack_settings(slack.api_url))
    store = Store(settings.database_url)
    link_channel(store, "CSOCK", str(repo), ADMIN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cli_env(settings)
    env.update(CODELOOP_SLACK__BOT_TOKEN="xoxb-test-token",
               CODELOOP_SLACK__SIGNING_SECRET="signing-secret",
               CODELOOP_SLACK__API_URL=slack.api_url, CODELOOP_WEB__PORT=str(port))
    missing = subprocess.run([sys.executable, "-m", "bot.cli", "serve", "--socket-mode"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert "--socket-mode needs CODELOOP_SLACK__APP_TOKEN" in missing.stderr

    env["CODELOOP_SLACK__APP_TOKEN"] = "xapp-test-token"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--socket-mode"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert ws.connected.wait(60), (tmp_path / "serve.log").read_text()
        body = json.loads(signing.event_body(
            {"type": "message", "channel": "CSOCK", "user": ALICE, "text": "Add a helper",
             "ts": "1800000000.000002", "channel_type": "channel"}, "EvSERVE"))
        ws.send({"envelope_id": "env-serve", "type": "events_api",
                 "accepts_response_payload": False, "retry_attempt": 0, "payload": body})
        slack.wait_for(lambda s: [t for t in s.texts() if t.startswith("Queued as #1")],
                       what="queued reply", timeout=60)
        with store.session() as s:
            assert s.query(Request).count() == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
        store.close()
        ws.stop()
        slack.stop()
