"""Private copies of a working tree for the sandbox, and their removal."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


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
