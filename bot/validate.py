"""Validate a generated change before it becomes a pull request.

Checks run in order and stop after the first kind that fails:

1. ``syntax``: ``ast.parse`` of every changed ``.py`` file.
2. ``ruff``: ``ruff check`` with a narrow rule set (syntax-level errors, undefined names,
   unused or redefined imports), so a repository's own style choices never fail a change.
3. ``tests``: the repository's test command, run with ``bash -c`` in the sandbox
   (``bot.sandbox``) on a throw-away copy of the working tree without its ``.git``.

``validate`` returns a ``ValidationResult``; ``sandbox_capabilities`` says whether the
sandbox works on this machine (for ``codeloop doctor``).
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bot.environments import add_build_files
from bot.ports import CheckResult, ValidationResult
from bot.sandbox import SandboxUnavailable, copy_tree, probe, remove_tree, run_sandboxed
from bot.scrub import scrub
from bot.settings import SandboxSettings

log = logging.getLogger(__name__)

__all__ = [
    "RUFF_RULES",
    "SandboxError",
    "run_tests",
    "sandbox_capabilities",
    "validate",
]

# Syntax-level errors (E9), broken comparisons (F63), misplaced statements (F7), undefined
# names (F82, F821), unused and redefined imports (F401, F811). Nothing about style.
RUFF_RULES = "E9,F63,F7,F82,F401,F811,F821"

OUTPUT_LINES = 60
OUTPUT_CHARS = 4000
RUFF_TIMEOUT_SECONDS = 120.0
_BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxError(RuntimeError):
    """The sandbox could not be set up (not a test failure: regenerating will not help).

    No repository code ran: the sandbox fails closed."""


# ---------------------------------------------------------------- entry point


def validate(
    workdir: Path,
    changed_paths: list[str],
    test_command: str | None,
    settings: SandboxSettings,
    secrets: Sequence[str] = (),
    env_dir: Path | None = None,
) -> ValidationResult:
    """Run syntax, ruff and test checks on a working tree; stop after the first failing kind.

    ``env_dir``: the repository's own environment (bot.environments) the tests run in."""
    workdir = Path(workdir)
    secrets = [s for s in secrets if s]
    py_files = _python_files(workdir, changed_paths)
    checks: list[CheckResult] = []
    steps = (
        lambda: check_syntax(workdir, py_files, secrets),
        lambda: check_ruff(workdir, py_files, settings, secrets),
        lambda: run_tests(workdir, test_command, settings, secrets, env_dir=env_dir),
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


# ---------------------------------------------------------------- tests in the sandbox


def sandbox_capabilities(settings: SandboxSettings | None = None) -> dict:
    """Whether the sandbox works here, for ``codeloop doctor`` and the worker's start."""
    settings = settings or SandboxSettings()
    found = probe(settings)
    return {"isolation": settings.isolation, "works": found.ok, "detail": found.detail,
            "bwrap_path": shutil.which("bwrap")}


def run_tests(
    workdir: Path,
    test_command: str | None,
    settings: SandboxSettings,
    secrets: Sequence[str] = (),
    *,
    env_dir: Path | None = None,
) -> CheckResult:
    """Run ``test_command`` with ``bash -c`` in the sandbox, on a private copy of ``workdir``.

    The copy has no ``.git``, so nothing the tests do can reach the bot's git. ``env_dir`` is a
    repository's own environment, mounted read-only at /env. Raises SandboxError when the
    sandbox does not work here (no test is run: fail closed).
    """
    if test_command is None:
        return CheckResult("tests", True, "no test command configured", 0.0, skipped=True)
    start = time.monotonic()
    secrets = [s for s in secrets if s]
    timeout = settings.timeout_seconds
    root = Path(tempfile.mkdtemp(prefix="codeloop-tests-"))
    try:
        copy = root / "repo"
        try:
            copy_tree(Path(workdir), copy)
            add_build_files(env_dir, copy)
        except (OSError, shutil.Error) as exc:
            raise SandboxError(f"could not copy the working tree: {exc}") from exc
        try:
            result = run_sandboxed(test_command, copy, settings, secrets=secrets,
                                   network=settings.network == "allow", env_dir=env_dir)
        except SandboxUnavailable as exc:
            raise SandboxError(str(exc)) from exc
    finally:
        remove_tree(root)
    where = "bwrap" if result.isolation == "bwrap" else "NONE (unsafe)"
    shared = settings.network == "allow" or result.isolation == "none"
    network = "host network" if shared else "no network"
    memory = (f"memory {settings.memory_mb} MB a process, {settings.total_memory_mb} MB in all"
              if result.cgroup else f"memory {settings.memory_mb} MB")
    header = f"[sandbox: {where}, {network}, timeout {timeout:g}s, {memory}]"
    lines = [header]
    body = _tail(result.output)
    if body:
        lines.append(body)
    if result.timed_out:
        lines.append(f"timed out after {timeout:g} s")
    elif result.returncode != 0:
        rc = result.returncode
        if rc is not None and rc < 0:
            try:
                lines.append(f"killed by signal {signal.Signals(-rc).name}")
            except ValueError:
                lines.append(f"killed by signal {-rc}")
        else:
            lines.append(f"exit status {rc}")
    return CheckResult("tests", result.ok, "\n".join(lines), time.monotonic() - start)


# ---------------------------------------------------------------- output helpers


def _scrub(text: str, secrets: Sequence[str]) -> str:
    return scrub(text, secrets)


def _tail(text: str, lines: int = OUTPUT_LINES, chars: int = OUTPUT_CHARS) -> str:
    text = text.rstrip()
    kept = text.splitlines()[-lines:]
    text = "\n".join(kept)
    if len(text) > chars:
        text = text[-chars:]
        if "\n" in text:
            text = text.partition("\n")[2]
    return text
