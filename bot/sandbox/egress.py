"""Network for set-up steps: an allow-list proxy instead of the host's network.

Set-up steps (`.codeloop.yml` `setup:`) download the repository's dependencies, and they run
code from the commit being set up — `setup.py`, build back-ends, install hooks — which, for
a revision of codeloop's own pull request, a model wrote. With the host's network they could
reach whatever the bot's machine reaches: its database and queue on loopback, the cloud's
metadata address, the LAN. So the sandbox of a set-up step gets no network of its own
(`--unshare-net`, loopback only) and one way out:

- inside, a small forwarder (FORWARDER, started by the trampoline's exec chain before the
  command) listens on 127.0.0.1:PROXY_PORT and passes each connection to a Unix socket bound
  into the sandbox;
- outside, `EgressProxy` answers on that socket as an HTTP proxy that accepts only
  `CONNECT host:port` to the hosts of `sandbox.setup_hosts` (exact names or `*.suffix`), on
  ports 443 and 80, and never to a loopback, link-local, multicast or unspecified address
  whatever a name resolves to. Everything it refuses is recorded, so a failing set-up says
  which destination was not allowed.

`HTTPS_PROXY`/`HTTP_PROXY` (both spellings) point pip, npm, git and curl at the forwarder.
docs/architecture.md, "Repository environments".
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import select
import socket
import socketserver
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

PROXY_PORT = 3128  # inside the sandbox's own network namespace
SOCKET_NAME = "codeloop-egress.sock"  # in the sandbox's private /tmp
ALLOWED_PORTS = (443, 80)
_HEAD_LIMIT = 16 * 1024
_CONNECT_TIMEOUT = 30.0

# Runs inside the sandbox as the sandbox user, after the trampoline: binds the proxy port,
# forks a child that relays each connection to the Unix socket, and execs the command.
FORWARDER = r"""
import os, socket, sys, threading
sock_path, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
if os.fork() == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    def pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    def serve(conn):
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.connect(sock_path)
        except OSError:
            conn.close()
            return
        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
listener.close()
os.execvp(sys.argv[3], sys.argv[3:])
"""


def proxy_env() -> dict[str, str]:
    url = f"http://127.0.0.1:{PROXY_PORT}"
    return {"HTTPS_PROXY": url, "https_proxy": url, "HTTP_PROXY": url, "http_proxy": url}


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, p.lower().rstrip(".")) for p in patterns)


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified \
        or ip.is_reserved


class EgressProxy:
    """The host side: a CONNECT-only proxy on a Unix socket for one sandbox run."""

    def __init__(self, socket_path: Path, allowed_hosts: Iterable[str]):
        self.socket_path = Path(socket_path)
        self.allowed = tuple(allowed_hosts)
        self.refused: list[str] = []  # "host:port (why)", in order, without repeats
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True
            block_on_close = False  # the run is over: never wait for a tunnel to drain

        self._server = Server(str(self.socket_path), Handler)
        self.socket_path.chmod(0o666)  # the sandbox user connects to it
        # A short poll: shutdown() waits for the serving loop to look (0.5 s by default).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        name="egress-proxy", daemon=True)

    def __enter__(self) -> EgressProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        try:
            self.socket_path.unlink()
        except OSError:
            pass

    def _refuse(self, conn: socket.socket, dest: str, why: str, status: str) -> None:
        with self._lock:
            if f"{dest} ({why})" not in self.refused:
                self.refused.append(f"{dest} ({why})")
        log.info("set-up network: refused %s: %s", dest, why)
        body = f"codeloop sandbox: {dest} refused: {why}\n".encode()
        try:
            conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
        except OSError:
            pass

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(_CONNECT_TIMEOUT)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
        except OSError:
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or parts[0].upper() != "CONNECT":
            what = parts[1] if len(parts) > 1 else line[:200]
            return self._refuse(conn, what[:200], "only HTTPS (CONNECT) goes through the set-up "
                                "proxy", "405 Method Not Allowed")
        dest = parts[1]
        host, sep, port_text = dest.rpartition(":")
        host = host.strip("[]")
        if not sep or not port_text.isdigit() or not host:
            return self._refuse(conn, dest[:200], "not host:port", "400 Bad Request")
        port = int(port_text)
        if port not in ALLOWED_PORTS:
            return self._refuse(conn, dest, f"port {port} is not one of "
                                f"{', '.join(map(str, ALLOWED_PORTS))}", "403 Forbidden")
        if not host_allowed(host, self.allowed):
            return self._refuse(conn, dest, "not in sandbox.setup_hosts", "403 Forbidden")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return self._refuse(conn, dest, f"name lookup failed: {exc}", "502 Bad Gateway")
        addresses = [info[4][0] for info in infos]
        bad = [a for a in addresses if _forbidden(a)]
        if bad:
            return self._refuse(conn, dest, f"resolves to {bad[0]}, an address of this host "
                                "or its link (never reachable from a set-up step)",
                                "403 Forbidden")
        try:
            upstream = socket.create_connection((addresses[0], port), timeout=_CONNECT_TIMEOUT)
        except OSError as exc:
            return self._refuse(conn, dest, f"could not connect: {exc}", "502 Bad Gateway")
        rest = head.split(b"\r\n\r\n", 1)[1]
        try:
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            _relay(conn, upstream)
        except OSError:
            pass
        finally:
            upstream.close()


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes (a TLS tunnel has nothing to say after that)
    or nothing moves for five minutes."""
    a.settimeout(None)
    b.settimeout(None)
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select([a, b], [], [], 300)
        if not readable:
            return
        for s in readable:
            data = s.recv(65536)
            if not data:
                return
            peers[s].sendall(data)
