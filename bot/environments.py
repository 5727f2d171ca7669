"""Each repository's own environment: `.codeloop.yml` `setup:` steps, built once, reused.

The steps run in the sandbox (bot.sandbox) with HTTPS to the allowed package hosts only
(bot/sandbox/egress.py), into a virtual environment mounted writable at /env; the tests
later run with the same environment mounted read-only and no network. An environment lives
under CODELOOP_HOME/envs/<key>, where the key hashes the interpreter, the steps, the dependency files' contents and anything else in the
repository a step names (`pip install ./vendor/pkg` keys on that directory's tree), so a
change to any of them builds a new one and an unchanged repository reuses the old one.
Old environments are evicted, least recently used first, once the cache passes its size.

The environment sees codeloop's own packages after its own (a `.pth` fallback), so a
repository that only needs its own dependencies installed does not have to reinstall a
test runner; what the set-up installs always wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bot import git
from bot.sandbox import SandboxUnavailable, copy_tree, remove_tree, run_sandboxed
from bot.settings import RepoConfig, Settings

log = logging.getLogger(__name__)

# Files whose content decides what a set-up installs.
DEPENDENCY_FILES = (
    "pyproject.toml", "setup.py", "setup.cfg", "requirements.txt", "requirements-dev.txt",
    "requirements-test.txt", "dev-requirements.txt", "test-requirements.txt", "poetry.lock",
    "uv.lock", "Pipfile", "Pipfile.lock", "pdm.lock", "tox.ini", "constraints.txt",
)
READY = ".codeloop-ready"  # written last: an environment without it is unfinished
# Files the set-up steps created inside the repository's copy (a version file written by
# setuptools-scm or hatch-vcs, compiled extensions, egg-info): kept with the environment and
# put into every test run's copy, where an editable install expects them.
BUILD_FILES = "codeloop-build-files"
_BUILD_FILES_LIMIT = 256 * 1024 * 1024  # bytes; a set-up that writes more keeps none
_NOT_BUILD_FILES = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".tox")
# A tag that is a plain PEP 440 release (v1.2.3, 2.0rc1); anything else is not passed on.
_RELEASE_TAG = re.compile(r"v?(\d+(?:\.\d+)*(?:(?:a|b|rc)\d+)?(?:\.post\d+)?(?:\.dev\d+)?)")


class SetupFailed(Exception):
    """A set-up step failed; the message has the step, its output's tail and a hint."""


@dataclass(frozen=True)
class Environment:
    key: str
    path: Path
    built: bool  # False: reused
    seconds: float
    steps: tuple[str, ...]

    def to_json(self) -> dict:
        return {"key": self.key, "path": str(self.path), "built": self.built,
                "seconds": round(self.seconds, 2), "steps": list(self.steps)}


def envs_dir(settings: Settings) -> Path:
    return settings.home / "envs"


def interpreter() -> str:
    return f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-{sys.platform}"


def environment_key(workdir: Path, sha: str, steps: list[str]) -> str:
    """What the environment depends on: interpreter, steps, dependency files, named paths."""
    h = hashlib.sha256()
    h.update(interpreter().encode())
    for step in steps:
        h.update(b"\0step\0" + step.encode())
    named: set[str] = set(DEPENDENCY_FILES)
    for step in steps:
        try:
            words = shlex.split(step)
        except ValueError:
            words = step.split()
        for word in words:
            word = word.split("[", 1)[0].removeprefix("./").rstrip("/")
            if word and not word.startswith("-") and "://" not in word:
                named.add(word)
    for name in sorted(named):
        obj = git.git(workdir, "rev-parse", "--verify", "--quiet", f"{sha}:{name}",
                      check=False).strip() if name else ""
        if obj:
            h.update(f"\0{name}\0{obj}".encode())
    return h.hexdigest()[:20]


def ensure(settings: Settings, config: RepoConfig, workdir: Path, sha: str,
           secrets: list[str] | tuple[str, ...] = ()) -> Environment | None:
    """The environment for `config.setup` at commit `sha` of `workdir`: reused when built
    before, else built now. None when the repository has no set-up steps.

    Raises SetupFailed (a step failed or timed out) or SandboxUnavailable."""
    steps = list(config.setup)
    if not steps:
        return None
    started = time.perf_counter()
    key = environment_key(workdir, sha, steps)
    root = envs_dir(settings)
    final = root / key
    if (final / READY).exists():
        os.utime(final / READY)  # recently used: evicted last
        return Environment(key, final, False, time.perf_counter() - started, tuple(steps))
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=root, prefix=f".building-{key}-"))
    os.chmod(building, 0o755)  # readable by the sandbox's unprivileged user
    scratch = Path(tempfile.mkdtemp(prefix="codeloop-setup-"))
    try:
        _make_venv(building)
        copy = scratch / "repo"
        copy_tree(workdir, copy)
        before = set(_tree_files(copy))
        version = vcs_version(workdir, sha)
        for step in steps:
            # The copy has no .git (nothing in the sandbox reaches the bot's git), so a build
            # that takes its version from git (setuptools-scm, hatch-vcs) is told it.
            command = (f': "${{SETUPTOOLS_SCM_PRETEND_VERSION:={version}}}"; '
                       f"export SETUPTOOLS_SCM_PRETEND_VERSION\n{step}")
            result = run_sandboxed(command, copy, settings.sandbox, secrets=secrets, setup=True,
                                   env_dir=building, env_writable=True,
                                   timeout=settings.sandbox.setup_timeout_seconds)
            if not result.ok:
                why = (f"timed out after {settings.sandbox.setup_timeout_seconds:g} s"
                       if result.timed_out else f"exited with status {result.returncode}")
                refused = ""
                if result.egress_refused:
                    refused = ("The set-up's network reaches only the hosts in "
                               "CODELOOP_SANDBOX__SETUP_HOSTS, over HTTPS; it refused: "
                               + "; ".join(result.egress_refused[:5]) + ".\n")
                raise SetupFailed(
                    f"the repository's set-up step `{step}` {why}, so nothing was generated.\n"
                    f"{_tail(result.output)}\n{refused}"
                    "Hint: run the step in a fresh virtual environment from the repository's "
                    "root; set-up steps run in the sandbox with HTTPS to the package registries "
                    "(sandbox.setup_hosts), the environment at /env (first on PATH) and the "
                    "repository at /workspace. Fix `setup:` in .codeloop.yml (or the files it "
                    "installs) and ask again."
                )
        kept = _keep_build_files(copy, before, building / BUILD_FILES)
        (building / READY).write_text(json.dumps({"steps": steps, "interpreter": interpreter(),
                                                  "sha": sha, "build_files": kept}))
        try:
            building.rename(final)
        except OSError:  # another worker finished the same environment first
            remove_tree(building)
    except BaseException:
        remove_tree(building)
        raise
    finally:
        remove_tree(scratch)
    evict(settings, keep=key)
    return Environment(key, final, True, time.perf_counter() - started, tuple(steps))


def vcs_version(workdir: Path, sha: str) -> str:
    """The release the commit descends from (its newest reachable tag, when that is a plain
    PEP 440 version), else 0.0.0: what setuptools-scm would have found in the clone."""
    tag = git.git(workdir, "describe", "--tags", "--abbrev=0", sha, check=False).strip()
    match = _RELEASE_TAG.fullmatch(tag)
    return match.group(1) if match else "0.0.0"


def _tree_files(root: Path):
    """Relative paths of the regular files under `root` (symbolic links are not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _NOT_BUILD_FILES]
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and not name.endswith(".pyc"):
                yield path.relative_to(root).as_posix()


def _keep_build_files(copy: Path, before: set[str], dest: Path) -> list[str]:
    """Copy the regular files the set-up created in the repository's copy to `dest`."""
    new = sorted(set(_tree_files(copy)) - before)
    if sum((copy / rel).stat().st_size for rel in new) > _BUILD_FILES_LIMIT:
        log.warning("set-up wrote over %d MB into the repository; none of it is kept",
                    _BUILD_FILES_LIMIT >> 20)
        return []
    for rel in new:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(copy / rel, target, follow_symlinks=False)
    return new


def add_build_files(env_dir: Path | None, copy: Path) -> list[str]:
    """Put the files the set-up created in the repository (see BUILD_FILES) into a test run's
    copy, where that copy has none of its own (a change's file is never replaced)."""
    source = env_dir / BUILD_FILES if env_dir is not None else None
    if source is None or not source.is_dir():
        return []
    added = []
    for rel in _tree_files(source):
        target = copy / rel
        if target.exists() or target.is_symlink():
            continue
        if not _no_links_between(copy, rel):
            continue  # never write through a link the change put in the tree
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target, follow_symlinks=False)
        added.append(rel)
    return added


def _no_links_between(root: Path, rel: str) -> bool:
    path = root
    for part in Path(rel).parts[:-1]:
        path = path / part
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return False
    return True


def _make_venv(path: Path) -> None:
    """A bare virtual environment (no pip copied in: pip comes from the fallback), with
    codeloop's site-packages after its own and a `pip` that installs into it."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", "--clear", str(path)], check=True,
                   capture_output=True)
    purelib = Path(sysconfig.get_paths()["purelib"])
    rel = Path(sysconfig.get_path("purelib", vars={"base": str(path),
                                                   "platbase": str(path)}))
    rel.mkdir(parents=True, exist_ok=True)
    (rel / "codeloop-fallback.pth").write_text(str(purelib) + "\n")
    for name in ("pip", "pip3"):
        script = path / "bin" / name
        script.write_text('#!/bin/sh\nexec /env/bin/python -m pip "$@"\n')
        script.chmod(0o755)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def evict(settings: Settings, keep: str | None = None) -> list[str]:
    """Remove the least recently used environments until the cache fits its size."""
    root = envs_dir(settings)
    if not root.is_dir():
        return []
    limit = settings.sandbox.env_cache_mb * 1024 * 1024
    envs = []
    for d in root.iterdir():
        if d.is_dir() and (d / READY).exists():
            envs.append(((d / READY).stat().st_mtime, d, _size(d)))
    total = sum(size for _, _, size in envs)
    removed = []
    for _, d, size in sorted(envs, key=lambda e: e[0]):
        if total <= limit:
            break
        if d.name == keep:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d.name)
        log.info("evicted repository environment %s (%d MB)", d.name, size // 2**20)
    return removed


def describe(settings: Settings, config: RepoConfig, workdir: Path | None = None,
             sha: str | None = None) -> str:
    """One line on a repository's set-up, for `codeloop doctor` and `github check`."""
    if not config.setup:
        return "no set-up steps (tests run with codeloop's own packages)"
    steps = "; ".join(config.setup)
    if workdir is None or sha is None:
        return f"{len(config.setup)} set-up step(s): {steps}"
    key = environment_key(workdir, sha, list(config.setup))
    final = envs_dir(settings) / key
    if (final / READY).exists():
        return (f"{len(config.setup)} set-up step(s): {steps}; environment {key} built "
                f"({_size(final) // 2**20} MB), reused by the next job")
    return f"{len(config.setup)} set-up step(s): {steps}; environment {key} not built yet " \
           "(the next job builds it)"


def cache_state(settings: Settings) -> dict:
    """What `codeloop doctor` says about the environments: how many, how big, each one's
    steps and when it was last used."""
    import importlib.util

    root = envs_dir(settings)
    lines, total, count = [], 0, 0
    if root.is_dir():
        for d in sorted(root.iterdir()):
            ready = d / READY
            if not (d.is_dir() and ready.exists()):
                continue
            count += 1
            size = _size(d)
            total += size
            try:
                steps = "; ".join(json.loads(ready.read_text()).get("steps", []))
            except (OSError, ValueError):
                steps = "?"
            used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ready.stat().st_mtime))
            lines.append(f"{d.name}: {size // 2**20} MB, last used {used} UTC, set-up: {steps}")
    return {"dir": str(root), "count": count, "mb": total // 2**20, "lines": lines,
            "venv": importlib.util.find_spec("venv") is not None}


__all__ = ["Environment", "SetupFailed", "SandboxUnavailable", "describe", "ensure", "evict"]
