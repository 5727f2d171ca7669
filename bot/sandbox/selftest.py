"""The sandbox's self-test (`codeloop doctor`): a probe that tries every way out the
sandbox must stop, run inside it, and the report of each attempt.
"""

from __future__ import annotations

import os
import secrets as _secrets
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot.sandbox.command import BASE_PATH
from bot.sandbox.run import probe, run_sandboxed
from bot.sandbox.trees import remove_tree
from bot.settings import SandboxSettings

_SELF_TEST = r'''
import os, socket, subprocess, sys, time
canary_file, victim_pid, canary_env, unix_path, abstract, port, marker, outside = sys.argv[1:9]
def attempt(name, fn):
    try:
        detail = fn()
    except Exception as exc:
        print("BLOCKED\t%s\t%s: %s" % (name, type(exc).__name__, str(exc)[:120]))
    else:
        print("ESCAPED\t%s\t%s" % (name, str(detail)[:200]))
def read_canary():
    return open(canary_file).read()
def read_environ():
    found = []
    for pid in [victim_pid] + [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            data = open("/proc/%s/environ" % pid, "rb").read()
        except OSError:
            continue
        if canary_env.encode() in data:
            found.append(pid)
    if found:
        return "canary environment read through /proc/%s/environ" % found[0]
    raise PermissionError("no process with the canary in its environment is visible")
def write_outside():
    for path in (outside, "/usr/codeloop-escape", "/etc/codeloop-escape"):
        try:
            open(path, "w").write("escaped")
            return "wrote " + path
        except OSError as exc:
            last = exc
    raise last
def unix_socket():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect(unix_path)
    return "connected to " + unix_path
def abstract_socket():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(2)
    s.connect("\0" + abstract)
    return "connected to the abstract socket"
def tcp():
    socket.create_connection(("127.0.0.1", int(port)), timeout=2)
    return "connected to 127.0.0.1:%s" % port
def become_root():
    os.setuid(0)
    return "setuid(0) worked"
def setns():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/proc/%s/ns/net" % victim_pid, os.O_RDONLY)
    if libc.setns(fd, 0) != 0:
        raise PermissionError("setns: errno %d" % ctypes.get_errno())
    return "joined the host's network namespace"
def capabilities():
    eff = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
    if int(eff, 16):
        return "effective capabilities %s" % eff
    raise PermissionError("no capabilities (uid %d)" % os.getuid())
attempt("read a file outside the copy", read_canary)
attempt("read another process's environment", read_environ)
attempt("join the host's network namespace", setns)
attempt("write outside the copy", write_outside)
attempt("connect to a Unix socket", unix_socket)
attempt("connect to an abstract Unix socket", abstract_socket)
attempt("open a TCP connection", tcp)
attempt("become root", become_root)
attempt("hold capabilities", capabilities)
subprocess.Popen(["bash", "-c", "exec -a %s sleep 300" % marker], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.2)
print("LEFT\tleave a process behind\tstarted " + marker)
'''


# A set-up step's one way out is the egress proxy (bot/sandbox/egress.py): this host's own
# services must stay out of reach, straight and through the proxy.
_SETUP_PROBE = r'''
import http.client, os, socket, sys
port = int(sys.argv[1])
reached = []
try:
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    reached.append("directly")
except OSError as exc:
    why = "direct: %s" % exc
proxy = os.environ.get("HTTPS_PROXY")
if proxy:
    host, proxy_port = proxy[len("http://"):].rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(proxy_port), timeout=10)
    c.set_tunnel("127.0.0.1", port)
    try:
        c.connect()
        reached.append("through the proxy")
    except OSError as exc:
        why += "; proxy: %s" % exc
if reached:
    print("ESCAPED\treach this host's services from a set-up step\treached 127.0.0.1:%d %s"
          % (port, " and ".join(reached)))
else:
    print("BLOCKED\treach this host's services from a set-up step\t%s" % why)
'''


def _setup_network_attempt(run, work: Path, settings: SandboxSettings,
                           server: socket.socket) -> tuple[str, bool, str]:
    name = "reach this host's services from a set-up step"
    port = server.getsockname()[1]
    (work / "setup_probe.py").write_text(_SETUP_PROBE)
    command = f"python setup_probe.py {port}"
    if run is run_sandboxed:
        result = run_sandboxed(command, work, settings, timeout=60, setup=True)
    else:
        result = run(command, work, settings, timeout=60)
    for attempt in _attempts(result.output):
        if attempt[0] == name:
            return attempt
    return name, False, f"the probe did not report: {result.output.strip()[-200:]}"


def _attempts(output: str) -> list[tuple[str, bool, str]]:
    """(name, blocked, detail) of each BLOCKED/ESCAPED line a probe printed."""
    found = []
    for line in output.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] in ("BLOCKED", "ESCAPED"):
            found.append((parts[1], parts[0] == "BLOCKED", parts[2]))
    return found


@dataclass
class SelfTest:
    ok: bool
    attempts: list[tuple[str, bool, str]] = field(default_factory=list)  # (name, blocked, detail)
    error: str | None = None


def _marker_alive(marker: str) -> bool:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.split(b"\0")[0] == marker.encode():
            return True
    return False


def self_test(settings: SandboxSettings, run=None) -> SelfTest:
    """Try to break out of the sandbox in every way it must stop; each attempt must fail.

    ``run`` runs the probe (``run_sandboxed`` by default); a test passes an unconfined runner
    to show that the probe does see an escape when there is one.
    """
    if run is None:
        if settings.isolation == "none":
            return SelfTest(False, error="sandbox.isolation is 'none': repository code runs "
                            "unconfined on this host")
        found = probe(settings, fresh=True)
        if not found.ok:
            return SelfTest(False, error=found.detail)
        run = run_sandboxed
    tag = _secrets.token_hex(8)
    base = Path(tempfile.mkdtemp(prefix="codeloop-selftest-"))  # short: a Unix socket lives here
    canary_file = base / "canary.key"
    canary_file.write_text(f"canary-{tag}\n")
    outside = base / "written-from-sandbox"
    canary_env = f"CODELOOP_SELFTEST_CANARY={tag}"
    marker = f"codeloop-selftest-{tag}"
    victim = subprocess.Popen(["sleep", "120"], env={"PATH": BASE_PATH,
                                                     "CODELOOP_SELFTEST_CANARY": tag})
    unix_path = str(base / "s.sock")
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    work = base / "work"
    try:
        servers[0].bind(unix_path)
        servers[1].bind(f"\0abstract-{tag}")
        servers[2].bind(("127.0.0.1", 0))
        for s in servers:
            s.listen(4)
        os.chmod(unix_path, 0o777)
        work.mkdir()
        (work / "selftest.py").write_text(_SELF_TEST)
        args = [str(canary_file), str(victim.pid), canary_env, unix_path, f"abstract-{tag}",
                str(servers[2].getsockname()[1]), marker, str(outside)]
        command = "python selftest.py " + " ".join(f"'{a}'" for a in args)
        result = run(command, work, settings, timeout=60)
        attempts = _attempts(result.output)
        time.sleep(0.2)
        alive = _marker_alive(marker)
        attempts.append(("leave a process behind", not alive,
                         "still running after the sandbox ended" if alive else
                         "every process of the sandbox is gone"))
        if outside.exists():
            attempts = [(n, b and n != "write outside the copy", d) for n, b, d in attempts]
        attempts.append(_setup_network_attempt(run, work, settings, servers[2]))
        expected = 11
        ok = len(attempts) == expected and all(blocked for _, blocked, _ in attempts)
        error = None if len(attempts) == expected else (
            f"the self-test did not run to its end: {result.output.strip()[-500:]}")
        return SelfTest(ok, attempts, error)
    finally:
        victim.kill()
        victim.wait()
        for s in servers:
            s.close()
        remove_tree(base)
