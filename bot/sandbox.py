"""The sandbox every piece of repository code runs in (tests, set-up steps, HumanEval).

Repository code is hostile until proven otherwise: a model wrote part of it, in answer to
text anyone may write, on a machine that holds the bot's keys. So it runs under bubblewrap:

- new user, PID, mount, IPC, UTS, cgroup and network namespaces; no capabilities; a new
  session; ``--die-with-parent``; ``no_new_privs``;
- as an unprivileged user: when codeloop runs as root, each sandbox running at once gets a
  host uid of its own (from ``sandbox.uid``'s range), and bubblewrap starts with just enough
  capability to let the trampoline below drop to it and enter a user namespace of its own;
  otherwise bubblewrap's own user namespace does it;
- a root file system built from nothing: ``/usr`` (and its ``/bin``/``/lib`` links), a few
  files of ``/etc``, the Python environment, all read-only; a fresh ``/proc``; a minimal
  ``/dev``; a private ``/tmp`` and ``HOME``; the job's private copy at ``/workspace`` as the
  only writable directory (plus ``/env`` during a set-up step). Nothing of CODELOOP_HOME,
  other workspaces, the user's repository, key files, ``/run`` or the host's ``/proc`` exists
  in there;
- limits on time, address space, processes, file size and open files, inherited by every
  process the command starts; the PID namespace dies with its first process, so the command
  and every descendant are gone when it ends or times out;
- an environment built from scratch: no variable of the bot's reaches it.

When bubblewrap cannot build that sandbox, nothing runs (fail closed): ``run_sandboxed``
raises ``SandboxUnavailable`` with the fix. ``sandbox.isolation: none`` runs repository code
directly on the host; it exists for machines where the operator accepts that, and it is
never chosen automatically.

``self_test`` tries to break out (read a canary file, another process's environment, write
outside, reach a Unix socket and a TCP port, leave a process behind) and reports each attempt;
``codeloop doctor`` prints it. See docs/architecture.md, "Trust boundaries".
"""

from __future__ import annotations

import fcntl
import functools
import os
import secrets as _secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bot.scrub import Scrubber
from bot.settings import SandboxSettings

__all__ = [
    "ENV_DIR",
    "WORKSPACE",
    "SandboxResult",
    "SandboxUnavailable",
    "copy_tree",
    "probe",
    "remove_tree",
    "run_sandboxed",
    "self_test",
]

WORKSPACE = "/workspace"  # the job's copy, inside the sandbox
ENV_DIR = "/env"  # a repository's own environment, inside the sandbox
HOME = "/home/sandbox"
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
OUTPUT_KEEP_BYTES = 64 * 1024  # the tail of the output kept in memory; the rest is counted
NPROC_LIMIT = 256  # processes and threads of the sandbox user at once
NOFILE_LIMIT = 1024
FSIZE_LIMIT = 1024**3
_PROBE_TIMEOUT_SECONDS = 20.0

# Files of /etc a program may need, read-only; everything else of /etc stays out.
_ETC = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf",
    "ssl", "ca-certificates", "ca-certificates.conf", "mime.types", "protocols", "services",
    "host.conf", "gai.conf", "os-release", "debian_version", "timezone",
)
_ETC_NETWORK = ("hosts", "resolv.conf")  # set-up steps with network only
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class SandboxUnavailable(RuntimeError):
    """No working isolation: repository code is not run. The message says how to fix it."""


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    returncode: int | None  # None when killed for the time limit
    output: str  # the tail of stdout and stderr, secrets masked
    timed_out: bool
    seconds: float
    isolation: str  # "bwrap" or "none"
    output_bytes: int = 0  # everything the command printed, kept or not


# ---------------------------------------------------------------- the trampoline

# Runs first inside the sandbox, as a separate program (not a preexec_fn, which is unsafe in a
# threaded process): sets hard resource limits, then — when bubblewrap ran as root — drops to
# the sandbox uid with no capabilities and enters a user namespace of its own, then execs.
_TRAMPOLINE = r"""
import ctypes, os, resource, sys
a = sys.argv
uid, gid, mem, nproc, fsize, nofile, drop = (int(x) for x in a[1:8])
def limit(res, value):
    soft, hard = resource.getrlimit(res)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(res, (value, value))
for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, fsize),
                   (resource.RLIMIT_NOFILE, nofile)):
    limit(res, value)
if drop:
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, CLONE_NEWUSER = 38, 24, 0x10000000
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit("[sandbox] prctl(NO_NEW_PRIVS) failed")
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid:
        sys.exit("[sandbox] could not drop to the sandbox user")
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: the uid change made /proc/self root's
    if libc.unshare(CLONE_NEWUSER) != 0:
        sys.exit("[sandbox] unshare(CLONE_NEWUSER) failed: errno %d" % ctypes.get_errno())
    with open("/proc/self/uid_map", "w") as f:
        f.write("%d %d 1\n" % (uid, uid))
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/gid_map", "w") as f:
        f.write("%d %d 1\n" % (gid, gid))
    cap = 0  # the new namespace gave a full bounding set again: empty it
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
os.execvp(a[8], a[8:])
"""


# ---------------------------------------------------------------- building the command


def _python_roots() -> list[str]:
    """Directories the sandbox needs for codeloop's Python (venv and base installation)."""
    roots: list[str] = []
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        path = os.path.realpath(prefix)
        if path.startswith("/usr/") or path == "/usr":
            continue
        if path not in roots:
            roots.append(path)
    # A venv's python is a symlink to the base interpreter; follow it too.
    real = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    if not real.startswith("/usr") and real not in roots:
        roots.append(real)
    return sorted(roots)


def _passwd(uid: int, gid: int) -> tuple[str, str]:
    passwd = f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{uid}:{gid}:codeloop sandbox:{HOME}:/bin/sh\n"
    group = f"root:x:0:\nsandbox:x:{gid}:\n"
    return passwd, group


def _bwrap_argv(
    bwrap: str, root: Path, workdir: Path, uid: int, settings: SandboxSettings, *,
    network: bool, env_dir: Path | None, env_writable: bool, as_root: bool,
) -> list[str]:
    gid = uid
    argv = [
        bwrap, "--die-with-parent", "--new-session",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "codeloop-sandbox",
    ]
    if not network:
        argv.append("--unshare-net")
    if as_root:
        # Only what the trampoline needs to drop to the sandbox uid; it then drops these too.
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                 "--cap-add", "CAP_SETPCAP"]
    else:
        argv += ["--unshare-user", "--uid", str(uid), "--gid", str(gid), "--disable-userns",
                 "--cap-drop", "ALL"]
    argv += ["--ro-bind", "/usr", "/usr", "--perms", "0755", "--dir", "/etc",
             "--perms", "0755", "--dir", "/home"]
    # The private /tmp and HOME first: what is bound read-only below may live under them on
    # the host (a virtualenv in a clone under /tmp) and must not be hidden by them.
    argv += [
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--tmpfs", "/dev/shm",
        "--bind", str(root / "tmp"), "/tmp",
        "--bind", str(root / "home"), HOME,
    ]
    read_only = [*_python_roots(), *(os.path.realpath(p) for p in settings.read_only_paths)]
    # bubblewrap gives the directories it creates on the way the host's modes (/root is 0700):
    # create them traversable first, or the sandbox user could not reach what is bound below.
    parents = {str(parent) for path in read_only for parent in Path(path).parents}
    for parent in sorted(parents - {"/", "/etc", "/home", "/tmp", HOME},
                         key=lambda p: p.count("/")):
        argv += ["--perms", "0755", "--dir", parent]
    for name in _ROOT_LINKS:
        host = Path("/") / name
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), f"/{name}"]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), f"/{name}"]
    for name in _ETC + (_ETC_NETWORK if network else ()):
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    for name in os.listdir("/etc"):
        if name.startswith("python3"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--ro-bind", str(root / "passwd"), "/etc/passwd",
             "--ro-bind", str(root / "group"), "/etc/group"]
    for path in read_only:
        argv += ["--ro-bind", path, path]
    argv += ["--bind", str(workdir), WORKSPACE]
    if env_dir is not None:
        argv += ["--bind" if env_writable else "--ro-bind", str(env_dir), ENV_DIR]
    argv += ["--chdir", WORKSPACE, "--"]
    return argv


def _sandbox_env(settings: SandboxSettings, env_dir: Path | None) -> dict[str, str]:
    path = [f"{ENV_DIR}/bin"] if env_dir is not None else []
    path.append(str(Path(sys.executable).parent))
    env = {
        "PATH": ":".join([*path, BASE_PATH]),
        "HOME": HOME,
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if env_dir is not None:
        env["VIRTUAL_ENV"] = ENV_DIR
    return env


UID_SLOTS = 1024


class _UidSlot:
    """One of UID_SLOTS host uids, held (a file lock) while one sandbox runs as it.

    Process limits are counted per host uid across all sandboxes that share it: a hostile
    test that fills its limit would starve every other job's sandbox. So each sandbox that
    runs at once gets a uid of its own, across every worker process on this host.
    """

    def __init__(self, base: int):
        # One place for every process on the host, whatever its TMPDIR: they must agree.
        lock_dir = Path("/tmp/codeloop-sandbox-uids")
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        start = _secrets.randbelow(UID_SLOTS)
        for i in range(UID_SLOTS):
            slot = (start + i) % UID_SLOTS
            fd = os.open(lock_dir / str(slot), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = base + slot, fd
            return
        raise SandboxUnavailable(f"all {UID_SLOTS} sandbox user ids are in use")

    def release(self) -> None:
        os.close(self._fd)  # closing the file releases its lock


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- probing


@dataclass
class Probe:
    ok: bool
    detail: str
    bwrap: str | None = None
    as_root: bool = False


def _probe_once(settings: SandboxSettings) -> Probe:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Probe(False, "bubblewrap is not installed: run `apt-get install bubblewrap` "
                     "(Debian/Ubuntu) or `dnf install bubblewrap`, or see the README's "
                     "'Sandbox' section")
    root = Path(tempfile.mkdtemp(prefix="codeloop-probe-"))
    try:
        work = root / "work"
        work.mkdir()
        result = _run(bwrap, os.geteuid() == 0, "test -w . && test ! -e /proc/1/environ -o "
                      "\"$(id -u)\" != 0 && echo sandbox-ok", work, root, settings,
                      network=False, env_dir=None, env_writable=False,
                      timeout=_PROBE_TIMEOUT_SECONDS, scrubber=Scrubber(()))
    except OSError as exc:
        return Probe(False, f"bubblewrap could not start: {exc}", bwrap)
    finally:
        remove_tree(root)
    if result.ok and "sandbox-ok" in result.output:
        return Probe(True, f"bubblewrap ({bwrap})", bwrap, os.geteuid() == 0)
    hint = ("bubblewrap needs user namespaces: allow them (sysctl kernel.unprivileged_userns_clone=1 "
            "or user.max_user_namespaces > 0); in a container, run the worker with the security "
            "options in deploy/docker-compose.yml")
    return Probe(False, f"bubblewrap failed: {result.output.strip()[-400:] or 'no output'}; {hint}",
                 bwrap, os.geteuid() == 0)


@functools.lru_cache(maxsize=8)
def _cached_probe(key: tuple) -> Probe:
    return _probe_once(SandboxSettings.model_validate(dict(key)))


def probe(settings: SandboxSettings, *, fresh: bool = False) -> Probe:
    """Whether the sandbox works here (cached per process and settings)."""
    key = tuple(sorted((k, str(v) if isinstance(v, Path) else v)
                       for k, v in settings.model_dump().items()
                       if k in ("uid", "read_only_paths")))
    key = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in key)
    if fresh:
        _cached_probe.cache_clear()
    return _cached_probe(key)


# ---------------------------------------------------------------- running


def _reader(stream, keep: bytearray, counter: list[int]) -> None:
    while True:
        chunk = stream.read(65536)
        if not chunk:
            return
        counter[0] += len(chunk)
        keep += chunk
        if len(keep) > 2 * OUTPUT_KEEP_BYTES:
            del keep[: len(keep) - OUTPUT_KEEP_BYTES]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _run(
    bwrap: str | None, as_root: bool, command: str, workdir: Path, root: Path,
    settings: SandboxSettings, *, network: bool, env_dir: Path | None, env_writable: bool,
    timeout: float, scrubber: Scrubber,
) -> SandboxResult:
    """Run ``command`` once; ``bwrap`` None means no isolation (the explicit unsafe choice)."""
    start = time.monotonic()
    slot = _UidSlot(settings.uid) if bwrap is not None and as_root else None
    try:
        return _run_as(slot.uid if slot else settings.uid, bwrap, as_root, command, workdir, root,
                       settings, network=network, env_dir=env_dir, env_writable=env_writable,
                       timeout=timeout, scrubber=scrubber, start=start)
    finally:
        if slot is not None:
            slot.release()


def _run_as(
    uid: int, bwrap: str | None, as_root: bool, command: str, workdir: Path, root: Path,
    settings: SandboxSettings, *, network: bool, env_dir: Path | None, env_writable: bool,
    timeout: float, scrubber: Scrubber, start: float,
) -> SandboxResult:
    for name in ("tmp", "home"):
        (root / name).mkdir(exist_ok=True)
    passwd, group = _passwd(uid, uid)
    (root / "passwd").write_text(passwd)
    (root / "group").write_text(group)
    os.chmod(root / "tmp", 0o1777)
    if bwrap is not None and as_root:
        for path in (root / "tmp", root / "home", workdir):
            _chown_tree(path, uid)
        if env_dir is not None and env_writable:
            _chown_tree(env_dir, uid)
        os.chmod(root, 0o755)
    drop = bwrap is not None and as_root  # bubblewrap ran as root: the trampoline drops
    limits = [str(uid), str(uid), str(settings.memory_mb * 1024 * 1024), str(NPROC_LIMIT),
              str(FSIZE_LIMIT), str(NOFILE_LIMIT), "1" if drop else "0"]
    tail = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, *limits, "bash", "-c", command]
    if bwrap is not None:
        argv = _bwrap_argv(bwrap, root, workdir, uid, settings, network=network,
                           env_dir=env_dir, env_writable=env_writable, as_root=as_root) + tail
        env = _sandbox_env(settings, env_dir)
        cwd = root
    else:
        argv = tail
        env = _sandbox_env(settings, None)
        env["HOME"], env["TMPDIR"] = str(root / "home"), str(root / "tmp")
        cwd = workdir
    keep, counter = bytearray(), [0]
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    reader = threading.Thread(target=_reader, args=(proc.stdout, keep, counter), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # The PID namespace dies with bubblewrap; without isolation, the group is all we have.
        _kill_group(proc.pid)
        proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()
    text = bytes(keep[-OUTPUT_KEEP_BYTES:]).decode("utf-8", errors="replace")
    if counter[0] > OUTPUT_KEEP_BYTES:
        text = text.partition("\n")[2]  # drop the partial first line
    rc = None if timed_out else proc.returncode
    return SandboxResult(ok=rc == 0, returncode=rc, output=scrubber(text), timed_out=timed_out,
                         seconds=time.monotonic() - start,
                         isolation="bwrap" if bwrap else "none", output_bytes=counter[0])


def run_sandboxed(
    command: str, workdir: Path, settings: SandboxSettings, *, secrets: Sequence[str] = (),
    network: bool = False, env_dir: Path | None = None, env_writable: bool = False,
    timeout: float | None = None,
) -> SandboxResult:
    """Run ``bash -c command`` in the sandbox with ``workdir`` as its writable /workspace.

    ``workdir`` must be a private copy: the command may change anything in it. ``env_dir``
    (a repository's own environment) is mounted at /env, writable only with ``env_writable``
    (set-up steps), and /env/bin comes first on PATH. ``network`` shares the host's network
    (set-up steps only; never for code the model wrote).

    Raises SandboxUnavailable when the sandbox does not work here and isolation is not
    explicitly "none".
    """
    workdir = Path(workdir).resolve()
    timeout = settings.timeout_seconds if timeout is None else timeout
    secrets = [s for s in secrets if s]
    scrubber = Scrubber(secrets)
    for value in _sandbox_env(settings, env_dir).values():
        if any(secret in value for secret in secrets):
            raise SandboxUnavailable("a secret value appears in the sandbox environment")
    if settings.isolation == "none":
        bwrap, as_root = None, False
    else:
        found = probe(settings)
        if not found.ok:
            raise SandboxUnavailable(f"repository code was not run: the sandbox does not work "
                                     f"here ({found.detail})")
        bwrap, as_root = found.bwrap, found.as_root
    root = Path(tempfile.mkdtemp(prefix="codeloop-sandbox-"))
    try:
        return _run(bwrap, as_root, command, workdir, root, settings, network=network,
                    env_dir=env_dir, env_writable=env_writable, timeout=timeout,
                    scrubber=scrubber)
    finally:
        remove_tree(root)
        if bwrap is not None and as_root:
            # Hand the copy back to the bot's user (the caller may read or delete it).
            try:
                _chown_tree(workdir, os.getuid())
                if env_dir is not None and env_writable:
                    _chown_tree(env_dir, os.getuid())
            except OSError:
                pass


# ---------------------------------------------------------------- copies


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    """Skip .git and anything that is not a file, directory or symlink (fifos, sockets)."""
    skipped = set()
    for name in names:
        if name == ".git":
            skipped.add(name)
            continue
        try:
            mode = os.lstat(os.path.join(directory, name)).st_mode
        except OSError:
            skipped.add(name)
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skipped.add(name)
    return skipped


def copy_tree(source: Path, dest: Path) -> None:
    """A private copy of a working tree without its .git: the bot's git is never in reach."""
    shutil.copytree(source, dest, symlinks=True, ignore=_copy_ignore)


def remove_tree(path: Path) -> None:
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    # The command may have left read-only directories behind: make them writable, retry.
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            try:
                os.chmod(os.path.join(dirpath, name), 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- self-test

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
        attempts: list[tuple[str, bool, str]] = []
        for line in result.output.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[0] in ("BLOCKED", "ESCAPED"):
                attempts.append((parts[1], parts[0] == "BLOCKED", parts[2]))
        time.sleep(0.2)
        alive = _marker_alive(marker)
        attempts.append(("leave a process behind", not alive,
                         "still running after the sandbox ended" if alive else
                         "every process of the sandbox is gone"))
        if outside.exists():
            attempts = [(n, b and n != "write outside the copy", d) for n, b, d in attempts]
        expected = 10
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
