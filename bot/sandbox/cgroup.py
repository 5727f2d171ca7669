"""A control group per sandbox run: one memory limit and one process limit for the whole
sandbox, where the host lets codeloop make control groups.

The trampoline's rlimits bound each process (address space) and the sandbox user's process
count, but 256 processes of 2 GiB each are more memory than most hosts have: a hostile test
could starve the bot, its database and every other sandbox. A control group bounds the sum.
When codeloop may create one (root with a writable cgroup v1 `memory`/`pids` hierarchy, or a
cgroup v2 sub-tree with those controllers delegated to it), each run gets its own group with
`sandbox.total_memory_mb` and NPROC_LIMIT; bubblewrap is started by a small shell that first
moves itself into the group, so every process of the sandbox is counted from its first
instruction. Without one, the per-process limits are what there is, and `codeloop doctor`
says so. docs/architecture.md, "The sandbox".
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

# Joins every cgroup.procs file given before `--`, then execs the rest (bubblewrap).
JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def _own_paths() -> dict[str, str]:
    """controller (or "" for cgroup v2) -> this process's cgroup path."""
    out: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(","):
            out[name] = path
    return out


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


@dataclass
class Placement:
    """Where this host lets codeloop create a sandbox's groups."""

    version: int  # 1 or 2
    parents: dict[str, Path]  # v1: controller -> parent dir; v2: {"": parent dir}

    def describe(self) -> str:
        if self.version == 2:
            return f"cgroup v2 under {self.parents['']}"
        return "cgroup v1 " + ", ".join(f"{k} under {v}" for k, v in sorted(self.parents.items()))


_cached: tuple[Placement | None, str] | None = None


def placement() -> tuple[Placement | None, str]:
    """(where groups can be made, or None; why not). Looked up once per process."""
    global _cached
    if _cached is None:
        _cached = _find()
    return _cached


def _find() -> tuple[Placement | None, str]:
    own = _own_paths()
    # cgroup v2 (unified) at the root: controllers must be delegated to our own group.
    if (CGROUP_ROOT / "cgroup.controllers").exists() and "" in own:
        parent = CGROUP_ROOT / own[""].lstrip("/")
        enabled = (parent / "cgroup.subtree_control").read_text().split() \
            if (parent / "cgroup.subtree_control").exists() else []
        if {"memory", "pids"} <= set(enabled) and _writable(parent):
            return Placement(2, {"": parent}), ""
        return None, (f"cgroup v2: the memory and pids controllers are not delegated to "
                      f"{parent} (or it is not writable)")
    parents: dict[str, Path] = {}
    for controller in ("memory", "pids"):
        base = CGROUP_ROOT / controller
        if controller not in own or not base.is_dir():
            return None, f"no cgroup v1 {controller} hierarchy"
        parent = base / own[controller].lstrip("/")
        if not _writable(parent):
            return None, f"cgroup v1 {controller}: {parent} is not writable"
        parents[controller] = parent
    return Placement(1, parents), ""


@dataclass
class Group:
    """One sandbox run's groups; `procs` are joined by the JOIN shell before bubblewrap."""

    placement: Placement
    dirs: dict[str, Path] = field(default_factory=dict)

    @property
    def procs(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def out_of_memory(self) -> bool:
        """Whether the memory limit stopped a process of this run."""
        try:
            if self.placement.version == 2:
                events = (self.dirs[""] / "memory.events").read_text()
                counts = dict(line.split() for line in events.splitlines() if line.strip())
                return int(counts.get("oom_kill", 0)) > 0 or int(counts.get("max", 0)) > 0
            memory = self.dirs["memory"]
            control = (memory / "memory.oom_control").read_text().split()
            kills = int(control[control.index("oom_kill") + 1]) if "oom_kill" in control else 0
            fails = [int((memory / name).read_text().strip() or 0)
                     for name in ("memory.failcnt", "memory.memsw.failcnt")
                     if (memory / name).exists()]
            return kills > 0 or any(fails)
        except (OSError, ValueError, KeyError, IndexError):
            return False

    def remove(self) -> None:
        for path in self.dirs.values():
            for _ in range(50):  # the PID namespace's processes may take a moment to go
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def create(memory_bytes: int, pids: int) -> Group | None:
    """A fresh group with these limits, or None where this host allows none."""
    found, _ = placement()
    if found is None:
        return None
    name = f"codeloop-sandbox-{secrets.token_hex(6)}"
    group = Group(found)
    try:
        for controller, parent in found.parents.items():
            path = parent / name
            path.mkdir()
            group.dirs[controller] = path
        if found.version == 2:
            unified = group.dirs[""]
            (unified / "memory.max").write_text(str(memory_bytes))
            if (unified / "memory.swap.max").exists():
                (unified / "memory.swap.max").write_text("0")
            (unified / "pids.max").write_text(str(pids))
        else:
            memory = group.dirs["memory"]
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            swap = memory / "memory.memsw.limit_in_bytes"
            if swap.exists():
                try:
                    swap.write_text(str(memory_bytes))
                except OSError:
                    pass
            (group.dirs["pids"] / "pids.max").write_text(str(pids))
    except OSError:
        group.remove()
        return None
    return group
