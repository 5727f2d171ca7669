"""Each repository's own environment: set-up steps in the sandbox, built once and reused,
tests run in it without the network, failures stop the job before generation."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select

from bot import jobs
from bot.environments import SetupFailed, describe, ensure, envs_dir, evict
from bot.runtime import build_runtime, execute
from bot.settings import parse_repo_config
from bot.store.models import JobStage
from bot.validate import run_tests
from tests.support import cli_env, git_out
from tests.fakes import ScriptedBackend
from tests.test_prompt_fit import make_repo

SLUGKIT_PYPROJECT = """[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "slugkit"
version = "1.0"

[tool.setuptools]
py-modules = ["slugkit"]
"""
SLUGKIT = '''def slug(text):
    """Lowercase words joined by dashes."""
    return "-".join(text.lower().split())
'''
TITLES = '''"""Titles for posts."""

from slugkit import slug


def url_for(title):
    """The URL path of a post."""
    return "/posts/" + slug(title)
'''
TITLE_TESTS = '''import socket

from titles import url_for


def test_url_for():
    assert url_for("Hello World") == "/posts/hello-world"


def test_no_network():
    try:
        socket.create_connection(("1.1.1.1", 53), timeout=2)
    except OSError:
        return
    raise AssertionError("the tests reached the network")
'''
SETUP = "pip install --no-build-isolation --no-index ./vendor/slugkit"
CONFIG = f"test_command: python -m pytest -q -p no:cacheprovider\nsetup:\n  - {SETUP}\n"


def repo_with_dependency(root):
    return make_repo(root, {
        "titles.py": TITLES, "test_titles.py": TITLE_TESTS,
        "vendor/slugkit/pyproject.toml": SLUGKIT_PYPROJECT, "vendor/slugkit/slugkit.py": SLUGKIT,
    }, config=CONFIG)


def test_codeloop_does_not_have_the_dependency():
    proc = subprocess.run([sys.executable, "-c", "import slugkit"], capture_output=True)
    assert proc.returncode != 0


def test_set_up_builds_once_and_the_tests_use_it_without_network(sqlite_settings, tmp_path):
    repo = repo_with_dependency(tmp_path / "repo")
    config = parse_repo_config((repo / ".codeloop.yml").read_text())
    sha = git_out(repo, "rev-parse", "HEAD").strip()
    assert "not built yet" in describe(sqlite_settings, config, repo, sha)
    without = run_tests(repo, config.test_command, sqlite_settings.sandbox)
    assert not without.ok and "slugkit" in without.output  # codeloop's packages alone fail
    cold = ensure(sqlite_settings, config, repo, sha)
    assert cold.built and cold.path.parent == envs_dir(sqlite_settings)
    warm = ensure(sqlite_settings, config, repo, sha)
    assert not warm.built and warm.path == cold.path and warm.seconds < cold.seconds
    result = run_tests(repo, config.test_command, sqlite_settings.sandbox, env_dir=warm.path)
    assert result.ok, result.output
    assert "built" in describe(sqlite_settings, config, repo, sha)
    # A change to what the set-up installs builds a new environment.
    (repo / "vendor/slugkit/slugkit.py").write_text(SLUGKIT + "\nVERSION = 2\n")
    git_out(repo, "commit", "-qam", "slugkit 2")
    sha2 = git_out(repo, "rev-parse", "HEAD").strip()
    other = ensure(sqlite_settings, config, repo, sha2)
    assert other.built and other.key != cold.key
    # Evicted by size, least recently used first; the one in use stays.
    small = sqlite_settings.model_copy(update={"sandbox": sqlite_settings.sandbox.model_copy(
        update={"env_cache_mb": 0})})
    assert evict(small, keep=other.key) == [cold.key]
    assert other.path.is_dir() and not cold.path.exists()


VERSIONED_TESTS = '''from pkg import __version__, double


def test_double():
    assert double(2) == 4


def test_version_from_the_tag():
    assert __version__ == "2.5.1"
'''
# As setuptools-scm or hatch-vcs do in an editable install: the build writes the version file
# into the source tree, from git or from SETUPTOOLS_SCM_PRETEND_VERSION when there is no git.
WRITE_VERSION = '''import os, pathlib
version = os.environ["SETUPTOOLS_SCM_PRETEND_VERSION"]
assert not pathlib.Path(".git").exists()
pathlib.Path("pkg/_version.py").write_text(f"__version__ = {version!r}\\n")
'''


def test_files_the_set_up_writes_into_the_tree_reach_every_test_run(sqlite_settings, tmp_path):
    """A version file generated at install time (ignored by git, as setuptools-scm's is) is in
    the copy the tests run on; the version comes from the commit's tag, since the sandbox's
    copy has no .git. A change's own file is never replaced, and a link the change puts in
    the way is not written through."""
    repo = make_repo(tmp_path / "repo", {
        "pkg/__init__.py": "from pkg._version import __version__\n\n\ndef double(x):\n"
                           "    return 2 * x\n",
        "test_pkg.py": VERSIONED_TESTS, "write_version.py": WRITE_VERSION,
        ".gitignore": "pkg/_version.py\n",
    }, config="test_command: python -m pytest -q -p no:cacheprovider\n"
              "setup:\n  - python write_version.py\n")
    git_out(repo, "tag", "v2.5.1")
    sha = git_out(repo, "rev-parse", "HEAD").strip()
    config = parse_repo_config((repo / ".codeloop.yml").read_text())
    without = run_tests(repo, config.test_command, sqlite_settings.sandbox)
    assert not without.ok and "pkg._version" in without.output
    env = ensure(sqlite_settings, config, repo, sha)
    assert not (repo / "pkg/_version.py").exists()  # the user's tree is untouched
    result = run_tests(repo, config.test_command, sqlite_settings.sandbox, env_dir=env.path)
    assert result.ok and "2 passed" in result.output, result.output
    # The change brings its own version file: that one is tested.
    (repo / "pkg/_version.py").write_text("__version__ = '9.9'\n")
    result = run_tests(repo, config.test_command, sqlite_settings.sandbox, env_dir=env.path)
    assert not result.ok and "'9.9' == '2.5.1'" in result.output
    # A change that makes pkg a link to somewhere else gets nothing written through it.
    (repo / "pkg/_version.py").unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / "pkg").rename(tmp_path / "pkg-moved")
    (repo / "pkg").symlink_to(outside)
    run_tests(repo, config.test_command, sqlite_settings.sandbox, env_dir=env.path)
    assert list(outside.iterdir()) == []


def test_a_failing_set_up_fails_the_job_before_generation(sqlite_settings, tmp_path):
    repo = make_repo(tmp_path / "repo", {"titles.py": TITLES},
                     config="test_command: python -m pytest -q\n"
                            "setup:\n  - pip install --no-index ./vendor/missing\n")
    backend = ScriptedBackend("never asked")
    runtime = build_runtime(sqlite_settings, backend=backend)
    sub = jobs.submit(runtime.store, source="cli", repo=str(repo), requirement="Add a helper",
                      max_bytes=100_000)
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "failed"
    assert "set-up step `pip install --no-index ./vendor/missing`" in outcome.error
    assert "Hint:" in outcome.error and "vendor/missing" in outcome.error
    assert backend.calls == []  # nothing generated
    assert not list(envs_dir(sqlite_settings).glob("*/.codeloop-ready"))  # no half environment
    with pytest.raises(SetupFailed):
        ensure(sqlite_settings, parse_repo_config((repo / ".codeloop.yml").read_text()), repo,
               git_out(repo, "rev-parse", "HEAD").strip())


@pytest.mark.model
def test_codeloop_run_builds_the_environment_once_and_reuses_it(sqlite_settings, tmp_path):
    repo = repo_with_dependency(tmp_path / "repo")
    requirements = ("Add a function count_words(text) to titles.py that returns how many "
                    "words the text has.",
                    "Add a function shout(text) to titles.py that returns the text in capitals.")
    for requirement in requirements:
        proc = subprocess.run([sys.executable, "-m", "bot.cli", "run", requirement, "--repo",
                               str(repo)], env=cli_env(sqlite_settings), capture_output=True,
                              text=True, timeout=1200)
        assert "setting up the repository's environment" in proc.stdout, proc.stdout + proc.stderr
    from bot.store.db import Store

    store = Store(sqlite_settings.database_url)
    with store.session() as s:
        setups = list(s.scalars(select(JobStage).where(JobStage.name == "setup")
                                .order_by(JobStage.id)))
        assert [st.output["built"] for st in setups] == [True, False]  # built once, reused
        assert setups[1].seconds < setups[0].seconds
        validated = list(s.scalars(select(JobStage).where(JobStage.name.like("validate-%"))))
        for st in validated:
            for check in st.output.get("validation", {}).get("checks", []):
                if check["name"] == "tests":
                    # The tests ran in the environment: the dependency imported.
                    assert "No module named 'slugkit'" not in check["output"]
                    assert "reached the network" not in check["output"]
        print("setup cold %.2f s, warm %.2f s" % (setups[0].seconds, setups[1].seconds))


def test_doctor_reports_the_environments(sqlite_settings, tmp_path):
    from bot.doctor import run_checks

    repo = repo_with_dependency(tmp_path / "repo")
    config = parse_repo_config((repo / ".codeloop.yml").read_text())
    env = ensure(sqlite_settings, config, repo, git_out(repo, "rev-parse", "HEAD").strip())
    [check] = run_checks(sqlite_settings, only=("environments",))
    assert check.status == "ok", check.message
    assert "1 built" in check.message and env.key in check.message and SETUP in check.message


def test_tests_cannot_change_the_environment_later_jobs_reuse(sqlite_settings, tmp_path):
    repo = repo_with_dependency(tmp_path / "repo")
    config = parse_repo_config((repo / ".codeloop.yml").read_text())
    env = ensure(sqlite_settings, config, repo, git_out(repo, "rev-parse", "HEAD").strip())
    site = next(env.path.glob("lib/python*/site-packages"))
    attack = ("echo 'raise SystemExit(0)' > /env/lib/python*/site-packages/slugkit.py; "
              "touch /env/poison; python -c 'import slugkit; print(slugkit.slug(\"A B\"))'")
    result = run_tests(repo, attack, sqlite_settings.sandbox, env_dir=env.path)
    assert "a-b" in result.output  # the environment was read-only: slugkit is intact
    assert not (env.path / "poison").exists()
    assert "raise SystemExit" not in (site / "slugkit.py").read_text()
