"""Validate a generated change before it becomes a pull request.

Checks run in order and stop after the first kind that fails:

1. ``syntax``: ``ast.parse`` of every changed ``.py`` file.
2. ``ruff``: ``ruff check`` with a narrow rule set (syntax-level errors, undefined names,
   unused or redefined imports), so a repository's own style choices never fail a change.
3. ``tests``: the repository's test command, run with ``bash -c`` in a sandbox: a
   throw-away copy of the working tree, a time limit that kills the whole process group,
   resource limits, an environment built from scratch (no tokens), and no network when
   ``settings.network == "isolate"`` (bubblewrap, else ``unshare``).

``validate`` returns a ``ValidationResult``; ``sandbox_capabilities`` reports which
network isolation works on this machine (for a ``doctor`` command).
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bot.ports import CheckResult, ValidationResult
from bot.settings import SandboxSettings

log = logging.getLogger(__name__)

__all__ = [
    "ISOLATIONS",
    "RUFF_RULES",
    "SandboxError",
    "run_tests",
    "sandbox_capabilities",
    "validate",
]

# Syntax-level errors (E9), broken comparisons (F63), misplaced statements (F7), undefined
# names (F82, F821), unused and redefined imports (F401, F811). Nothing about style.
RUFF_RULES = "E9,F63,F7,F82,F401,F811,F821"

# Network isolation methods, best first. "none" runs with the host network.
ISOLATIONS = ("bwrap", "unshare-net", "unshare-net-userns", "none")

OUTPUT_LINES = 60
OUTPUT_CHARS = 4000
_READ_TAIL_BYTES = 64 * 1024
NPROC_LIMIT = 1024  # counted per user, threads included: keep it well above the bot's own
FSIZE_LIMIT = 1024**3
RUFF_TIMEOUT_SECONDS = 120.0
_PROBE_TIMEOUT_SECONDS = 10.0
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not a test failure: regenerating will not help)."""


# ---------------------------------------------------------------- entry point


def validate(
    workdir: Path,
    changed_paths: list[str],
    test_command: str | None,
    settings: SandboxSettings,
    secrets: Sequence[str] = (),
) -> ValidationResult:
    """Run syntax, ruff and test checks on a working tree; stop after the first failing kind."""
    workdir = Path(workdir)
    secrets = [s for s in secrets if s]
    py_files = _python_files(workdir, changed_paths)
    checks: list[CheckResult] = []
    steps = (
        lambda: check_syntax(workdir, py_files, secrets),
        lambda: check_ruff(workdir, py_files, settings, secrets),
        lambda: run_tests(workdir, test_command, settings, secrets),
    )
    for step in steps:
        result = step()
        checks.append(result)
        log.debug("validation check %s: ok=%s skipped=%s", result.name, result.ok, result.skipped)
        if not result.ok and not result.skipped:
            break
    ok = all(c.ok for c in checks if not c.skipped)
    return ValidationResult(ok=ok, checks=tuple(checks))


def _python_files(workdir: Path, changed_paths: Sequence[str]) -> list[str]:
    """Changed ``.py`` files that exist inside ``workdir``, repository-relative, deduplicated."""
    root = workdir.resolve()
    out: list[str] = []
    for rel in changed_paths:
        if not rel.endswith(".py"):
            continue
        path = (root / rel).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            continue  # deleted, or pointing outside the tree
        rel_norm = path.relative_to(root).as_posix()
        if rel_norm not in out:
            out.append(rel_norm)
    return out


# ---------------------------------------------------------------- syntax


def check_syntax(
    workdir: Path, py_files: Sequence[str], secrets: Sequence[str] = ()
) -> CheckResult:
    start = time.monotonic()
    if not py_files:
        return CheckResult("syntax", True, "no Python files changed", 0.0, skipped=True)
    problems: list[str] = []
    for rel in py_files:
        try:
            source = (Path(workdir) / rel).read_bytes()
        except OSError as exc:
            problems.append(f"{rel}: cannot read: {exc.strerror or exc}")
            continue
        try:
            ast.parse(source, filename=rel)
        except SyntaxError as exc:
            where = f"{rel}:{exc.lineno or 0}"
            if exc.offset:
                where += f":{exc.offset}"
            problems.append(f"{where}: {type(exc).__name__}: {exc.msg}")
            if exc.text and exc.text.strip():
                problems.append(f"    {exc.text.rstrip()}")
        except ValueError as exc:  # e.g. null bytes in the source
            problems.append(f"{rel}:1: {exc}")
    output = "\n".join(problems) if problems else f"{len(py_files)} file(s) parsed"
    return CheckResult(
        "syntax", not problems, _tail(_scrub(output, secrets)), time.monotonic() - start
    )


# ---------------------------------------------------------------- ruff


def _find_ruff() -> str | None:
    beside = Path(sys.executable).parent / "ruff"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("ruff")


def check_ruff(
    workdir: Path, py_files: Sequence[str], settings: SandboxSettings, secrets: Sequence[str] = ()
) -> CheckResult:
    start = time.monotonic()
    if not settings.ruff:
        return CheckResult("ruff", True, "ruff disabled in settings", 0.0, skipped=True)
    if not py_files:
        return CheckResult("ruff", True, "no Python files changed", 0.0, skipped=True)
    ruff = _find_ruff()
    if ruff is None:
        return CheckResult("ruff", True, "ruff not found", 0.0, skipped=True)

    base = [ruff, "check", "--select", RUFF_RULES, "--output-format", "concise", "--no-cache"]
    env = {"PATH": _BASE_PATH, "LANG": "C.UTF-8"}
    attempts = (base, [*base, "--isolated"])  # retry without the repository's own ruff config
    rc, output = 2, ""
    for argv in attempts:
        try:
            proc = subprocess.run(
                [*argv, "--", *py_files],
                check=False,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=RUFF_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            rc, output = 2, f"ruff could not run: {exc}"
            break
        rc, output = proc.returncode, (proc.stdout + proc.stderr).strip()
        if rc in (0, 1):
            break
    seconds = time.monotonic() - start
    output = _tail(_scrub(output, secrets))
    if rc == 0:
        return CheckResult("ruff", True, output or "no problems", seconds)
    if rc == 1:
        return CheckResult("ruff", False, output, seconds)
    # ruff itself failed (bad config, crash): not something a regenerated change can fix.
    log.warning("ruff failed with exit status %s; ruff check skipped: %s", rc, output[-500:])
    return CheckResult("ruff", True, f"ruff error (exit status {rc}):\n{output}", seconds, True)


# ---------------------------------------------------------------- network isolation


def _probe(argv: list[str]) -> bool:
    try:
        proc = subprocess.run(
            argv,
            check=False,
            env={"PATH": _BASE_PATH, "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_PROBE_TIMEOUT_SECONDS,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


@functools.cache
def _isolation_prefixes() -> dict[str, tuple[str, ...]]:
    """Working isolation methods and the argv prefix of each; probed once per process."""
    found: dict[str, tuple[str, ...]] = {}
    bwrap = shutil.which("bwrap")
    if bwrap:
        prefix = (bwrap, "--dev-bind", "/", "/", "--unshare-net", "--die-with-parent")
        if _probe([*prefix, "true"]):
            found["bwrap"] = prefix
    unshare = shutil.which("unshare")
    if unshare:
        # Plain `unshare --net` keeps the caller's identity (needs root / CAP_SYS_ADMIN);
        # with a user namespace it also works unprivileged where user namespaces are allowed.
        for name, prefix in (
            ("unshare-net", (unshare, "--net")),
            ("unshare-net-userns", (unshare, "--net", "--map-root-user")),
        ):
            if _probe([*prefix, "--", "true"]):
                found[name] = (*prefix, "--")
    return found


def sandbox_capabilities() -> dict:
    """Which network isolation works here, for a ``doctor`` command.

    ``network_isolation`` is the method ``validate`` uses (``None``: tests would run with the
    host network); ``available`` lists every method that works, best first.
    """
    found = _isolation_prefixes()
    available = [name for name in ISOLATIONS if name in found]
    return {
        "network_isolation": available[0] if available else None,
        "available": available,
        "bwrap": "bwrap" in found,
        "unshare": any(name.startswith("unshare") for name in found),
        "bwrap_path": shutil.which("bwrap"),
        "unshare_path": shutil.which("unshare"),
    }


# ---------------------------------------------------------------- tests in a sandbox

# Runs inside the sandbox (after bwrap/unshare, before bash): sets resource limits, brings
# the loopback interface of a fresh network namespace up, then execs the command. A separate
# program rather than a preexec_fn, which is unsafe in a process that runs threads.
_TRAMPOLINE = r"""
import os, resource, sys
a = sys.argv
for res, value in ((resource.RLIMIT_AS, int(a[1])), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NPROC, int(a[2])), (resource.RLIMIT_FSIZE, int(a[3]))):
    soft, hard = resource.getrlimit(res)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError) as exc:
        print("[sandbox] could not set resource limit %s: %s" % (res, exc), file=sys.stderr)
if a[4] == "1":
    import fcntl, socket, struct
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]
        if not flags & 1:
            fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))
        s.close()
    except OSError:
        pass
os.execvp(a[5], a[5:])
"""


def _choose_isolation(settings: SandboxSettings, isolation: str | None) -> str:
    if isolation is not None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"unknown isolation {isolation!r}; expected one of {ISOLATIONS}")
        if isolation != "none" and isolation not in _isolation_prefixes():
            raise SandboxError(f"isolation {isolation!r} does not work on this machine")
        return isolation
    if settings.network == "allow":
        return "none"
    found = _isolation_prefixes()
    for name in ISOLATIONS:
        if name in found:
            return name
    log.warning("network isolation unavailable: tests run with the host network")
    return "none"


def _sandbox_env(root: Path, secrets: Sequence[str]) -> dict[str, str]:
    home, tmp = root / "home", root / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{_BASE_PATH}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": str(tmp),
    }
    for value in env.values():
        if any(secret in value for secret in secrets):
            raise SandboxError("a secret value appears in the sandbox environment")
    return env


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


def _remove_tree(path: Path) -> None:
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
    if path.exists():
        log.warning("could not remove sandbox directory %s", path)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits without reaping it (so its process group id stays taken).

    Returns False when the deadline passes first.
    """
    delay = 0.005
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.1)


def _read_tail(fh) -> str:
    fh.flush()
    size = fh.seek(0, os.SEEK_END)
    start = max(0, size - _READ_TAIL_BYTES)
    fh.seek(start)
    text = fh.read().decode("utf-8", errors="replace")
    if start > 0:
        text = text.partition("\n")[2]  # drop the partial first line
    return text


def run_tests(
    workdir: Path,
    test_command: str | None,
    settings: SandboxSettings,
    secrets: Sequence[str] = (),
    *,
    isolation: str | None = None,
) -> CheckResult:
    """Run ``test_command`` with ``bash -c`` in a sandboxed copy of ``workdir``.

    ``isolation``: one of ``ISOLATIONS`` to force a method, or None to pick the best that
    works (``"none"`` when ``settings.network == "allow"``).
    """
    if test_command is None:
        return CheckResult("tests", True, "no test command configured", 0.0, skipped=True)
    start = time.monotonic()
    secrets = [s for s in secrets if s]
    mode = _choose_isolation(settings, isolation)
    prefix = _isolation_prefixes().get(mode, ())
    timeout = settings.timeout_seconds
    header = (
        f"[sandbox: {'host-network' if mode == 'none' else mode}, "
        f"timeout {timeout:g}s, memory {settings.memory_mb} MB]"
    )

    root = Path(tempfile.mkdtemp(prefix="codeloop-sandbox-"))
    try:
        os.chmod(root, 0o700)
        copy = root / "repo"
        try:
            shutil.copytree(workdir, copy, symlinks=True, ignore=_copy_ignore)
        except (OSError, shutil.Error) as exc:
            raise SandboxError(f"could not copy the working tree: {exc}") from exc
        env = _sandbox_env(root, secrets)
        if mode == "bwrap":
            prefix = (*prefix, "--chdir", str(copy), "--")
        argv = [
            *prefix,
            sys.executable,
            "-I",
            "-S",
            "-c",
            _TRAMPOLINE,
            str(settings.memory_mb * 1024 * 1024),
            str(NPROC_LIMIT),
            str(FSIZE_LIMIT),
            "0" if mode in ("none", "bwrap") else "1",  # bwrap brings loopback up itself
            "bash",
            "-c",
            test_command,
        ]
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=copy,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise SandboxError(f"could not start the test command: {exc}") from exc
            try:
                finished = _wait_exited(proc.pid, start + timeout)
            finally:
                # Kill the whole group: on timeout, and any background process left behind.
                _kill_group(proc.pid)
                proc.wait()
            text = _read_tail(out)
    finally:
        _remove_tree(root)

    body = _tail(_scrub(text, secrets))
    lines = [header]
    if body:
        lines.append(body)
    if not finished:
        lines.append(f"timed out after {timeout:g} s")
        ok = False
    elif proc.returncode != 0:
        rc = proc.returncode
        if rc < 0:
            try:
                lines.append(f"killed by signal {signal.Signals(-rc).name}")
            except ValueError:
                lines.append(f"killed by signal {-rc}")
        else:
            lines.append(f"exit status {rc}")
        ok = False
    else:
        ok = True
    return CheckResult("tests", ok, "\n".join(lines), time.monotonic() - start)


# ---------------------------------------------------------------- output helpers


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _tail(text: str, lines: int = OUTPUT_LINES, chars: int = OUTPUT_CHARS) -> str:
    text = text.rstrip()
    kept = text.splitlines()[-lines:]
    text = "\n".join(kept)
    if len(text) > chars:
        text = text[-chars:]
        if "\n" in text:
            text = text.partition("\n")[2]
    return text
