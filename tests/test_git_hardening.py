"""The bot's git cannot be steered by the repository it works on (the second wall behind the
sandbox): hooks and repository-local programs never run, and only the validated tree is pushed.

Everything is real git on real repositories; the hooks are planted directly in the workspace,
as if the sandbox had failed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from bot import git, workspace
from bot.demo import make_sample_repo

HOOKS = ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-checkout",
         "reference-transaction", "pre-push", "post-rewrite", "pre-auto-gc")


def _plant(hooks_dir: Path, witness: Path) -> None:
    hooks_dir.mkdir(parents=True, exist_ok=True)
    for name in HOOKS:
        hook = hooks_dir / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {witness}\n")
        hook.chmod(0o755)


@pytest.fixture
def origin(tmp_path) -> Path:
    return make_sample_repo(tmp_path / "origin")


def test_planted_hooks_never_run_in_any_bot_git_command(tmp_path, origin):
    witness = tmp_path / "hooks-ran"
    root = tmp_path / "workspaces"
    workdir, start = workspace.prepare(root, 1, str(origin), "main")
    _plant(workdir / ".git" / "hooks", witness)
    # A repository-local config that points hooks and the file-system monitor elsewhere.
    _plant(tmp_path / "elsewhere", witness)
    (tmp_path / "monitor").write_text(f"#!/bin/sh\necho fsmonitor >> {witness}\n")
    (tmp_path / "monitor").chmod(0o755)
    subprocess.run(["git", "config", "core.hooksPath", str(tmp_path / "elsewhere")],
                   cwd=workdir, check=True)
    subprocess.run(["git", "config", "core.fsmonitor", str(tmp_path / "monitor")],
                   cwd=workdir, check=True)

    workspace.reset(workdir, start)
    (workdir / "notes.txt").write_text("hello\n")
    git.git(workdir, "add", "--", "notes.txt")
    git.git(workdir, "status", "--porcelain")
    git.git(workdir, "commit", "--quiet", "-m", "notes")
    head = git.rev(workdir, "HEAD")
    git.verify_commit(workdir, start, head, git.blob_ids(workdir, ["notes.txt"]))
    git.git(workdir, "push", "--quiet", "origin", f"{head}:refs/heads/codeloop/1-notes")
    workspace.prepare(root, 1, str(origin), "main")  # fetch + checkout + clean again

    assert not witness.exists(), f"ran: {witness.read_text()}"
    assert git.rev(origin, "refs/heads/codeloop/1-notes") == head
    message = git.git(origin, "log", "-1", "--format=%B", "codeloop/1-notes").strip()
    assert message == "notes"  # no prepare-commit-msg / commit-msg rewrote it


def _commit(workdir: Path, start: str, files: dict[str, str], symlinks: dict[str, str] = {}):
    workspace.reset(workdir, start)
    for rel, text in files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_text(text)
    for rel, target in symlinks.items():
        os.symlink(target, workdir / rel)
    git.git(workdir, "add", "-A")
    git.git(workdir, "commit", "--quiet", "-m", "change")
    return git.rev(workdir, "HEAD")


def test_only_the_validated_tree_passes_the_check(tmp_path, origin):
    workdir, start = workspace.prepare(tmp_path / "ws", 1, str(origin), "main")
    validated = {"textutil.py": "def whisper(t):\n    return t.lower()\n"}
    head = _commit(workdir, start, validated)
    expected = git.blob_ids(workdir, ["textutil.py"])
    git.verify_commit(workdir, start, head, expected)  # exactly the validated change: fine

    # One more file than was validated (a hook's or a test's doing): refused.
    extra = _commit(workdir, start, {**validated, ".github/workflows/x.yml": "on: push\n"})
    with pytest.raises(git.GitError, match=r"\.github/workflows/x\.yml changed but was not"):
        git.verify_commit(workdir, start, extra, expected)

    # The same path with other content: refused.
    other = _commit(workdir, start, {"textutil.py": "import os; os.system('id')\n"})
    with pytest.raises(git.GitError, match="textutil.py differs from the validated content"):
        git.verify_commit(workdir, start, other, expected)

    # A symbolic link where a file was validated: refused.
    workspace.reset(workdir, start)
    link = _commit(workdir, start, {}, symlinks={"secret": "/etc/passwd"})
    with pytest.raises(git.GitError, match="secret changed but was not validated"):
        git.verify_commit(workdir, start, link, expected)

    # Two commits on the start commit: refused (only one commit, on the start, is pushed).
    workspace.reset(workdir, head)
    (workdir / "more.txt").write_text("x\n")
    git.git(workdir, "add", "-A")
    git.git(workdir, "commit", "--quiet", "-m", "second")
    second = git.rev(workdir, "HEAD")
    with pytest.raises(git.GitError, match="is not one commit on"):
        git.verify_commit(workdir, start, second, expected)


def test_deleted_file_is_checked_too(tmp_path, origin):
    workdir, start = workspace.prepare(tmp_path / "ws", 1, str(origin), "main")
    (workdir / "README.md").unlink()
    git.git(workdir, "add", "-A")
    git.git(workdir, "commit", "--quiet", "-m", "remove readme")
    head = git.rev(workdir, "HEAD")
    git.verify_commit(workdir, start, head, {"README.md": None})
    with pytest.raises(git.GitError, match="README.md differs"):
        git.verify_commit(workdir, start, head, {"README.md": "0" * 40})
