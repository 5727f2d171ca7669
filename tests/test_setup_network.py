"""The network of a set-up step (bot/sandbox/egress.py), tried for real: a set-up step runs the
commit's build scripts, which on a revision a model wrote, so it must reach the package hosts
and nothing of the machine the bot runs on."""

from __future__ import annotations

import socket
import threading
import pytest

from bot.demo import make_sample_repo
from bot.environments import READY, SetupFailed, ensure, envs_dir
from bot.repo_config import parse_repo_config
from bot.sandbox import run_sandboxed
from bot.settings import SandboxSettings
from tests.support import git_out, make_settings


class Listener:
    """A TCP server on the host that counts who reached it and answers one HTTP line."""

    def __init__(self, host: str, port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\nhost-service")
            finally:
                conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread: port is free
        except OSError:
            pass
        self.sock.close()


def tunnel(dest: str) -> str:
    """Python run inside the sandbox: one GET through the proxy's CONNECT to `dest`."""
    host, port = dest.rsplit(":", 1)
    return ("python3 -c \"import http.client, os; p = os.environ['HTTPS_PROXY'].rsplit(':', 1); "
            "c = http.client.HTTPConnection(p[0][7:], int(p[1]), timeout=10); "
            f"c.set_tunnel('{host}', {port}); c.request('GET', '/'); "
            "print('GOT', c.getresponse().read().decode())\"")


def host_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()


def test_a_set_up_step_reaches_no_service_of_this_host(tmp_path):
    """Straight at loopback, through the proxy by name and by address, at the cloud's
    metadata address, at a host not in the list: all refused, the service never reached."""
    service = Listener("127.0.0.1")
    work = tmp_path / "w"
    work.mkdir()
    # "localhost" is listed on purpose: a listed name that resolves to loopback is refused too.
    settings = SandboxSettings(timeout_seconds=60, setup_hosts=["pypi.org", "localhost"])
    command = "; ".join([
        f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {service.port}), "
        "timeout=3)\" && echo DIRECT-REACHED",
        tunnel(f"127.0.0.1:{service.port}"),
        tunnel("localhost:443"),
        tunnel("169.254.169.254:80"),
        tunnel("example.com:443"),
        "curl -sS --max-time 5 http://169.254.169.254/latest/meta-data/",
        "echo done",
    ])
    try:
        result = run_sandboxed(command, work, settings, setup=True, timeout=120)
    finally:
        service.close()
    assert "done" in result.output, result.output
    assert "DIRECT-REACHED" not in result.output and "GOT" not in result.output
    assert service.accepted == 0
    refused = "\n".join(result.egress_refused)
    assert f"127.0.0.1:{service.port} (port {service.port} is not one of 443, 80)" in refused
    assert "localhost:443 (resolves to 127.0.0.1" in refused
    assert "169.254.169.254:80 (not in sandbox.setup_hosts)" in refused
    assert "example.com:443 (not in sandbox.setup_hosts)" in refused
    assert "http://169.254.169.254/latest/meta-data/ (only HTTPS (CONNECT)" in refused
    # Tests (no network at all) never get the proxy.
    quiet = run_sandboxed(tunnel("pypi.org:443") + " || echo NO-PROXY", work, settings,
                          timeout=60)
    assert "NO-PROXY" in quiet.output and quiet.egress_refused == ()


def test_a_set_up_step_reaches_a_listed_host_through_the_proxy(tmp_path):
    """The way out that is allowed works: a host named in `setup_hosts` (here this machine's
    own address on its network, on port 80, standing in for a package mirror)."""
    address = host_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    try:
        mirror = Listener(address, 80)
    except OSError as exc:  # port 80 needs root and must be free
        pytest.skip(f"cannot listen on {address}:80 here: {exc}")
    work = tmp_path / "w"
    work.mkdir()
    settings = SandboxSettings(timeout_seconds=60, setup_hosts=[address])
    try:
        result = run_sandboxed(tunnel(f"{address}:80"), work, settings, setup=True,
                               timeout=120)
    finally:
        mirror.close()
    assert result.ok and "GOT host-service" in result.output, result.output
    assert mirror.accepted == 1 and result.egress_refused == ()
    # With the host's network (the unsafe opt-in) the same step goes straight there.
    assert SandboxSettings(setup_network="host").setup_network == "host"


def test_a_set_up_that_needs_an_unlisted_host_says_which(tmp_path):
    """The requester learns why the set-up failed: the refused destination and the setting."""
    repo = make_sample_repo(tmp_path / "repo")
    settings = make_settings(tmp_path / "home", sandbox=SandboxSettings(
        timeout_seconds=120, setup_hosts=["pypi.org"]))
    config = parse_repo_config(
        "setup:\n  - pip download --no-deps -d /tmp/d --index-url "
        "https://downloads.example.org/simple six\n")
    with pytest.raises(SetupFailed) as failed:
        ensure(settings, config, repo, git_out(repo, "rev-parse", "HEAD").strip(), [])
    message = str(failed.value)
    assert "downloads.example.org:443 (not in sandbox.setup_hosts)" in message
    assert "CODELOOP_SANDBOX__SETUP_HOSTS" in message
    envs = envs_dir(settings)
    assert not envs.exists() or not any((p / READY).exists() for p in envs.iterdir())
