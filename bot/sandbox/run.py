"""Running a command in the sandbox: whether bubblewrap works here (`probe`), a host uid per
sandbox running at once, the run itself with its time limit and output tail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import secrets as _secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.sandbox.command import (
    FSIZE_LIMIT,
    NOFILE_LIMIT,
    NPROC_LIMIT,
    OUTPUT_KEEP_BYTES,
    TRAMPOLINE,
    bwrap_argv,
    passwd_files,
    sandbox_env,
)
from bot.sandbox import cgroup
from bot.sandbox.egress import FORWARDER, PROXY_PORT, SOCKET_NAME, EgressProxy, proxy_env
from bot.sandbox.trees import remove_tree
from bot.scrub import Scrubber
from bot.settings import SandboxSettings

_PROBE_TIMEOUT_SECONDS = 20.0


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
    memory_exceeded: bool = False  # the sandbox's control group hit its memory limit
    cgroup: bool = False  # the run had a control group of its own (memory and process limits)
    egress_refused: tuple[str, ...] = ()  # set-up network: destinations the proxy refused


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
                      network=False, egress=False, env_dir=None, env_writable=False,
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
    settings: SandboxSettings, *, network: bool, egress: bool, env_dir: Path | None,
    env_writable: bool, timeout: float, scrubber: Scrubber,
) -> SandboxResult:
    """Run ``command`` once; ``bwrap`` None means no isolation (the explicit unsafe choice)."""
    start = time.monotonic()
    slot = _UidSlot(settings.uid) if bwrap is not None and as_root else None
    try:
        return _run_as(slot.uid if slot else settings.uid, bwrap, as_root, command, workdir, root,
                       settings, network=network, egress=egress, env_dir=env_dir,
                       env_writable=env_writable, timeout=timeout, scrubber=scrubber, start=start)
    finally:
        if slot is not None:
            slot.release()


def _run_as(
    uid: int, bwrap: str | None, as_root: bool, command: str, workdir: Path, root: Path,
    settings: SandboxSettings, *, network: bool, egress: bool, env_dir: Path | None,
    env_writable: bool, timeout: float, scrubber: Scrubber, start: float,
) -> SandboxResult:
    for name in ("tmp", "home"):
        (root / name).mkdir(exist_ok=True)
    passwd, group = passwd_files(uid, uid)
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
    program = ["bash", "-c", command]
    # Set-up steps: no network of their own, HTTPS to the allowed hosts through a proxy
    # (bot/sandbox/egress.py).
    proxied = egress and bwrap is not None
    if proxied:
        program = [sys.executable, "-I", "-S", "-c", FORWARDER, f"/tmp/{SOCKET_NAME}",
                   str(PROXY_PORT), *program]
    tail = [sys.executable, "-I", "-S", "-c", TRAMPOLINE, *limits, *program]
    if bwrap is not None:
        argv = bwrap_argv(bwrap, root, workdir, uid, settings, network=network,
                           env_dir=env_dir, env_writable=env_writable, as_root=as_root) + tail
        env = sandbox_env(settings, env_dir)
        if proxied:
            env.update(proxy_env())
        cwd = root
    else:
        argv = tail
        env = sandbox_env(settings, None)
        env["HOME"], env["TMPDIR"] = str(root / "home"), str(root / "tmp")
        cwd = workdir
    # One memory and process limit for the whole sandbox, where the host allows a control
    # group: a shell joins it, then execs bubblewrap (bot/sandbox/cgroup.py).
    group = cgroup.create(settings.total_memory_mb * 1024 * 1024, NPROC_LIMIT + 16) \
        if bwrap is not None else None
    if group is not None:
        argv = ["/bin/sh", "-c", cgroup.JOIN, "sh", *group.procs, "--", *argv]
    proxy = EgressProxy(root / "tmp" / SOCKET_NAME, settings.setup_hosts) if proxied else None
    try:
        with proxy if proxy is not None else contextlib.nullcontext():
            result = _supervise(argv, cwd, env, timeout, scrubber, start, bwrap)
        if group is not None:
            result = dataclasses.replace(result, cgroup=True,
                                         memory_exceeded=group.out_of_memory())
            if result.memory_exceeded:
                result = dataclasses.replace(result, output=result.output + (
                    f"\n[sandbox: stopped at its memory limit of {settings.total_memory_mb} MB "
                    "for all its processes together (sandbox.total_memory_mb)]"))
    finally:
        if group is not None:
            group.remove()
    if proxy is not None and proxy.refused:
        result = dataclasses.replace(result, egress_refused=tuple(proxy.refused))
    return result


def _supervise(argv: list[str], cwd: Path, env: dict[str, str], timeout: float,
               scrubber: Scrubber, start: float, bwrap: str | None) -> SandboxResult:
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
    network: bool = False, setup: bool = False, env_dir: Path | None = None,
    env_writable: bool = False, timeout: float | None = None,
) -> SandboxResult:
    """Run ``bash -c command`` in the sandbox with ``workdir`` as its writable /workspace.

    ``workdir`` must be a private copy: the command may change anything in it. ``env_dir``
    (a repository's own environment) is mounted at /env, writable only with ``env_writable``
    (set-up steps), and /env/bin comes first on PATH. ``setup`` marks a set-up step: it gets
    the network `settings.setup_network` names — HTTPS to `settings.setup_hosts` through the
    egress proxy (bot/sandbox/egress.py) and nothing else, or the host's. ``network`` shares
    the host's network (the unsafe `sandbox.network: allow` for tests).

    Raises SandboxUnavailable when the sandbox does not work here and isolation is not
    explicitly "none".
    """
    workdir = Path(workdir).resolve()
    timeout = settings.timeout_seconds if timeout is None else timeout
    egress = setup and settings.setup_network == "allowlist"
    network = network or (setup and settings.setup_network == "host")
    secrets = [s for s in secrets if s]
    scrubber = Scrubber(secrets)
    for value in sandbox_env(settings, env_dir).values():
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
                    egress=egress, env_dir=env_dir, env_writable=env_writable, timeout=timeout,
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
