"""`codeloop demo`: the whole loop on a sample repository with the embedded model.

sample repository → requirement → validated pull request → approve → merge → signals.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

SAMPLE_FILES = {
    "textutil.py": '''"""Small text helpers."""


def slugify(text):
    """Lower-case words joined by dashes."""
    return "-".join(text.lower().split())


def shout(text):
    """Upper-case text with an exclamation mark."""
    return text.upper() + "!"
''',
    "tests/test_textutil.py": '''from textutil import shout, slugify


def test_slugify():
    assert slugify("Hello Big World") == "hello-big-world"


def test_shout():
    assert shout("hi") == "HI!"
''',
    "README.md": "# textutil\n\nSmall text helpers.\n",
    ".codeloop.yml": "test_command: python -m pytest -q\n",
    ".gitignore": "__pycache__/\n",
    "conftest.py": "",
}

DEMO_REQUIREMENT = (
    "Add a function count_vowels(text) to textutil.py that returns how many vowels "
    "(a, e, i, o, u) the text contains."
)
# The demo states an example: it becomes a requirement test that a wrong answer (counting
# words, say) fails, where the repository's own tests would pass it.
DEMO_EXAMPLE = ' For example, count_vowels("Hello World") returns 3.'



def make_sample_repo(path: Path, files: dict[str, str] | None = None) -> Path:
    """A small git repository with a passing test suite (used by the demo and the tests)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (files or SAMPLE_FILES).items():
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    env_args = ["-c", "user.name=Demo User", "-c", "user.email=demo@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", *env_args, "commit", "-q", "-m", "Initial commit"], cwd=path, check=True)
    return path


def _codeloop(home: Path, *args: str) -> int:
    import os

    env = {**os.environ, "CODELOOP_HOME": str(home)}
    print(f"\n$ codeloop {' '.join(args)}", flush=True)
    return subprocess.call([sys.executable, "-m", "bot.cli", *args], env=env)


def _say_what_was_proven(home: Path) -> bool:
    """The demo's point: what validation proved about the change, not just that it ran.

    Returns whether a requirement test rejected an answer."""
    import os

    from sqlalchemy import select

    from bot import verdict
    from bot.settings import Settings
    from bot.store.db import Store
    from bot.store.models import Candidate, JobStage, Revision

    old = os.environ.get("CODELOOP_HOME")
    os.environ["CODELOOP_HOME"] = str(home)
    try:
        store = Store(Settings().database_url)
    finally:
        if old is None:
            os.environ.pop("CODELOOP_HOME", None)
        else:
            os.environ["CODELOOP_HOME"] = old
    with store.session() as s:
        rejected = [st for st in s.scalars(select(JobStage).where(JobStage.state == "done"))
                    if st.name.startswith("validate-") and not st.output.get("ok")]
        answers = {f"validate-{c.attempt}": c.text for c in s.scalars(
            select(Candidate).where(Candidate.chosen.is_(False)).order_by(Candidate.idx))}
        rev = s.scalar(select(Revision).order_by(Revision.id.desc()))
        print("\nwhat validation proved:")
        for st in rejected:
            why = (st.output.get("reason") or "").strip().splitlines()
            print(f"  {st.name}: rejected — {why[0].lstrip('# ') if why else 'failed'}")
            code = answers.get(st.name, "").split("def count_vowels", 1)[1:]
            body = [ln.strip() for ln in (code[0].splitlines() if code else [])
                    if ln.strip().startswith("return")][:1]
            if body:
                print(f"      the answer:  {body[0]}")
            detail = [ln for ln in why if "assert" in ln][:1]
            if detail:
                print(f"      the test:    {detail[0].strip()}")
        if rev is not None:
            print(f"  accepted: {verdict.line(rev.validation)}")
        return any("requirement test" in (st.output.get("reason") or "") for st in rejected)


def run_demo(root: Path) -> int:
    root = root.resolve()
    shutil.rmtree(root, ignore_errors=True)
    repo = make_sample_repo(root / "sample-repo")
    home = root / "codeloop-home"
    started = time.perf_counter()
    print(f"codeloop demo: a sample repository at {repo} (2 passing tests)")
    requirement = DEMO_REQUIREMENT + DEMO_EXAMPLE
    print(f"requirement: {requirement}")
    if _codeloop(home, "run", requirement, "--repo", str(repo)) != 0:
        caught = _say_what_was_proven(home)
        if not caught:
            print("\nthe demo's job failed; see the reason above", file=sys.stderr)
            return 1
        # The point of requirement tests: a wrong answer that passes the repository's own
        # tests is refused instead of merged. That is the demo's result, not a breakage.
        print("\nno pull request: every answer failed the requirement's own example, so "
              "codeloop refused to open one (and left no branch). The existing tests alone "
              "would have passed it.")
        print(f"demo finished in {time.perf_counter() - started:.0f} s; data in {home}")
        return 0
    _say_what_was_proven(home)
    steps = [
        ("show", "1", "--diff"),
        ("review", "1", "--approve"),
        ("merge", "1"),
        ("show", "1"),
    ]
    for step in steps:
        if _codeloop(home, *step) != 0:
            return 1
    log = subprocess.run(["git", "log", "--oneline", "-3"], cwd=repo, capture_output=True, text=True)
    print("\n$ git log --oneline -3   (in the sample repository)")
    print(log.stdout.rstrip())
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s. Where everything is:")
    print(f"  sample repository  {repo}")
    print(f"  database (SQLite)  {home / 'codeloop.db'}   (requests, jobs, PRs, revisions, signals)")
    print(f"  job queue          {home / 'queue.db'}")
    print(f"  workspaces         {home / 'workspaces'}")
    print(f"  retrieval index    {home / 'index'}")
    from bot.settings import Settings

    print(f"  model cache        {Settings().embedded.cache_dir}")
    return 0
