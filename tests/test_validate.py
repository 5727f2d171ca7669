"""validate(): syntax, ruff and the test command in a sandbox, with real subprocesses."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from bot.ports import ValidationResult
from bot.settings import SandboxSettings
from bot.validate import SandboxError, run_tests, sandbox_capabilities, validate



def _running(marker: str) -> bool:
    """Whether any process on this host has `marker` as its name (argv[0])."""
    for pid in os.listdir("/proc"):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0 == marker.encode():
            return _alive(int(pid))
    return False


def _settings(**kw) -> SandboxSettings:
    kw.setdefault("timeout_seconds", 60)
    return SandboxSettings(**kw)


def _repo(tmp_path: Path, files: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    for rel, text in files.items():
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return repo


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _check(result: ValidationResult, name: str):
    return next(c for c in result.checks if c.name == name)


# ---------------------------------------------------------------- syntax and ruff


def test_syntax_error_names_file_and_line_and_stops(tmp_path):
    repo = _repo(tmp_path, {"pkg/ok.py": "x = 1\n", "pkg/bad.py": "x = 1\n\ndef f(:\n    pass\n"})
    result = validate(repo, ["pkg/ok.py", "pkg/bad.py"], "true", _settings())
    assert not result.ok
    assert [c.name for c in result.checks] == ["syntax"]  # ruff and tests never ran
    assert "pkg/bad.py:3" in result.checks[0].output
    assert "SyntaxError" in result.checks[0].output
    assert "syntax: FAILED" in result.summary()


def test_undefined_name_fails_ruff(tmp_path):
    repo = _repo(tmp_path, {"mod.py": "def f():\n    return undefined_thing\n"})
    result = validate(repo, ["mod.py"], "true", _settings())
    assert not result.ok
    assert [c.name for c in result.checks] == ["syntax", "ruff"]
    ruff = _check(result, "ruff")
    assert not ruff.ok and not ruff.skipped
    assert "F821" in ruff.output and "undefined_thing" in ruff.output
    assert "mod.py:2" in ruff.output


def test_style_only_issues_pass_ruff(tmp_path):
    long_line = "x = " + " + ".join(["1"] * 60) + "\n"
    repo = _repo(tmp_path, {"style.py": "import os\nl = 1\n" + long_line + "print(os.sep, l)\n"})
    result = validate(repo, ["style.py", "README.md", "gone.py"], None, _settings())
    assert result.ok, result.failures_text()
    assert _check(result, "ruff").ok and not _check(result, "ruff").skipped
    tests = _check(result, "tests")
    assert tests.skipped and tests.ok and tests.output == "no test command configured"


def test_ruff_disabled_and_no_python_files_skip(tmp_path):
    repo = _repo(tmp_path, {"mod.py": "def f():\n    return undefined_thing\n"})
    result = validate(repo, ["mod.py"], None, _settings(ruff=False))
    assert result.ok
    assert _check(result, "ruff").skipped
    result = validate(repo, ["notes.txt"], None, _settings())
    assert result.ok and all(c.skipped for c in result.checks)
    assert result.summary() == "syntax: skipped, ruff: skipped, tests: skipped"


# ---------------------------------------------------------------- tests in the sandbox

TEST_OK = "def test_x():\n    assert 1 + 1 == 2\n"
TEST_FAIL = "def test_x():\n    assert 1 + 1 == 3\n"


def test_passing_tests_pass(tmp_path):
    repo = _repo(tmp_path, {"test_x.py": TEST_OK})
    result = validate(repo, ["test_x.py"], "python -m pytest -q", _settings())
    assert result.ok, result.failures_text()
    tests = _check(result, "tests")
    assert tests.ok and not tests.skipped
    assert tests.output.splitlines()[0].startswith("[sandbox: ")
    assert "1 passed" in tests.output
    assert all(c.seconds >= 0 for c in result.checks) and tests.seconds > 0


def test_failing_tests_fail_with_assertion(tmp_path):
    repo = _repo(tmp_path, {"test_x.py": TEST_FAIL})
    result = validate(repo, ["test_x.py"], "python -m pytest -q", _settings())
    assert not result.ok
    tests = _check(result, "tests")
    assert not tests.ok
    assert "assert (1 + 1) == 3" in tests.output or "assert 2 == 3" in tests.output
    assert "1 failed" in tests.output
    assert tests.output.endswith("exit status 1")
    assert "## tests" in result.failures_text()


def test_hanging_command_is_killed_with_every_descendant(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    marker = f"codeloop-hang-{os.getpid()}-{time.time_ns()}"
    command = f"(exec -a {marker} sleep 60) & echo started; sleep 60"
    start = time.monotonic()
    result = validate(repo, [], command, _settings(timeout_seconds=2))
    elapsed = time.monotonic() - start
    assert elapsed < 8, elapsed
    tests = _check(result, "tests")
    assert not result.ok and not tests.ok
    assert "timed out after 2 s" in tests.output
    assert tests.output.endswith("timed out after 2 s")
    assert "started" in tests.output
    assert not _running(marker), "background child survived the timeout"


@pytest.mark.parametrize("how", ["&", "setsid", "nohup-disown"])
def test_background_process_left_behind_is_killed(tmp_path, how):
    repo = _repo(tmp_path, {"a.txt": "a"})
    marker = f"codeloop-bg-{os.getpid()}-{time.time_ns()}"
    spawn = {
        "&": f"(exec -a {marker} sleep 60) &",
        "setsid": f"setsid bash -c 'exec -a {marker} sleep 60' &",
        "nohup-disown": f"nohup bash -c 'exec -a {marker} sleep 60' >/dev/null 2>&1 & disown",
    }[how]
    start = time.monotonic()
    result = run_tests(repo, f"{spawn} sleep 0.3; exit 0", _settings())
    assert result.ok, result.output
    assert time.monotonic() - start < 8  # did not wait for the background sleep
    assert not _running(marker), "a process of the sandbox outlived it"


def test_sandbox_env_has_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secretvalue")
    monkeypatch.setenv("CODELOOP_BACKEND__API_KEY", "sk-other")
    repo = _repo(tmp_path, {"a.txt": "a"})
    result = validate(repo, [], "env", _settings())
    tests = _check(result, "tests")
    assert tests.ok, tests.output
    assert "ghp_secretvalue" not in tests.output
    assert "GITHUB_TOKEN" not in tests.output and "sk-other" not in tests.output
    names = {line.split("=", 1)[0] for line in tests.output.splitlines()[1:] if "=" in line}
    # bash adds PWD, SHLVL and _ itself; nothing comes from the parent environment.
    assert names <= {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "TMPDIR",
        "PWD",
        "SHLVL",
        "_",
    }
    assert {"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "TMPDIR"} <= names


def test_python_on_path_is_this_interpreter(tmp_path):
    import sys

    repo = _repo(tmp_path, {"a.txt": "a"})
    result = run_tests(repo, "command -v python", _settings())
    assert result.ok, result.output
    assert result.output.splitlines()[-1] == str(Path(sys.executable).parent / "python")


def test_secrets_are_scrubbed_from_output(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    result = validate(
        repo, [], "echo token=ghp_secretvalue; exit 3", _settings(), secrets=["ghp_secretvalue", ""]
    )
    tests = _check(result, "tests")
    assert not tests.ok
    assert "ghp_secretvalue" not in tests.output
    assert "token=***" in tests.output
    assert tests.output.endswith("exit status 3")


def test_secret_in_sandbox_environment_is_refused(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    with pytest.raises(SandboxError):
        run_tests(repo, "true", _settings(), secrets=["/usr/bin"])  # a part of PATH


def _listening_socket():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def _connect_command(port: int) -> str:
    return (
        'python -c "import socket; '
        f"socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\""
    )


def test_network_is_isolated(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    with _listening_socket() as server:
        port = server.getsockname()[1]
        result = validate(repo, [], _connect_command(port), _settings(network="isolate"))
    tests = _check(result, "tests")
    assert not tests.ok, tests.output
    assert "connected" not in tests.output
    assert tests.output.startswith("[sandbox: bwrap, no network, ")


def test_network_allowed_reaches_host(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    with _listening_socket() as server:
        port = server.getsockname()[1]
        result = validate(repo, [], _connect_command(port), _settings(network="allow"))
    tests = _check(result, "tests")
    assert tests.ok, tests.output
    assert "connected" in tests.output
    assert tests.output.startswith("[sandbox: bwrap, host network, ")


def test_sandbox_has_its_own_loopback(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    # The namespace's own loopback works, so test suites can run local servers.
    own = (
        "python -c \"import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "socket.create_connection(s.getsockname(), timeout=2); print('loopback ok')\""
    )
    result = run_tests(repo, own, _settings())
    assert result.ok, result.output
    assert "loopback ok" in result.output


def test_workdir_is_not_modified_and_copy_is_removed(tmp_path, monkeypatch):
    repo = _repo(tmp_path, {"test_x.py": TEST_OK, "data/keep.txt": "original\n"})
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    os.mkfifo(repo / "a.fifo")
    before = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the sandbox makes its copy
    command = (
        "pwd; test ! -e .git && echo no-git; "
        "echo new > created.txt && echo changed > data/keep.txt && "
        "mkdir -p ro/sub && chmod 500 ro/sub ro && python -m pytest -q"
    )
    result = validate(repo, ["test_x.py"], command, _settings())
    assert result.ok, result.failures_text()
    assert "no-git" in result.checks[-1].output
    assert not (repo / "created.txt").exists()
    assert (repo / "data" / "keep.txt").read_text() == "original\n"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == before
    assert result.checks[-1].output.splitlines()[1] == "/workspace"  # a copy, not the tree
    assert list(scratch.iterdir()) == []  # the copy and the sandbox's own directory are gone


def test_memory_limit_applies(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    result = run_tests(repo, "python -c 'x = bytearray(1024 ** 3)'", _settings(memory_mb=256))
    assert not result.ok
    assert "MemoryError" in result.output
    assert "memory 256 MB" in result.output.splitlines()[0]


def test_output_keeps_only_the_tail(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    result = run_tests(repo, "for i in $(seq 1 5000); do echo line-$i; done; exit 1", _settings())
    assert not result.ok
    lines = result.output.splitlines()
    assert lines[0].startswith("[sandbox: ")
    assert "line-5000" in result.output and "line-1\n" not in result.output
    assert len(lines) <= 62 and len(result.output) <= 4200


def test_sandbox_capabilities_say_it_works_here():
    caps = sandbox_capabilities(SandboxSettings())
    assert caps["works"], caps["detail"]  # CI installs bubblewrap: the real path is tested
    assert caps["isolation"] == "bwrap" and caps["bwrap_path"]


def test_broken_repo_ruff_config_falls_back_to_isolated(tmp_path):
    repo = _repo(
        tmp_path,
        {"pyproject.toml": '[tool.ruff]\nline-length = "x"\n', "m.py": "def f():\n    return y\n"},
    )
    result = validate(repo, ["m.py"], None, _settings())
    ruff = _check(result, "ruff")
    assert not ruff.ok and not ruff.skipped
    assert "F821" in ruff.output


def _without_bwrap(tmp_path: Path, script: str, repo: Path):
    """Run `script` in a fresh process whose PATH has no bwrap (only bash and sleep)."""
    import subprocess
    import sys

    bin_dir = tmp_path / "bin-without-bwrap"
    bin_dir.mkdir()
    for tool in ("bash", "sleep", "env"):
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    return subprocess.run(
        [sys.executable, "-c", script, str(repo)],
        check=False,
        env={"PATH": str(bin_dir), "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_without_bubblewrap_nothing_runs_fail_closed(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    witness = tmp_path / "ran"
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bot.settings import SandboxSettings\n"
        "from bot.validate import SandboxError, run_tests\n"
        f"try:\n    run_tests(Path(sys.argv[1]), 'touch {witness}', SandboxSettings())\n"
        "except SandboxError as exc:\n    print('refused:', exc)\n"
    )
    proc = _without_bwrap(tmp_path, script, repo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("refused: repository code was not run")
    assert "apt-get install bubblewrap" in proc.stdout
    assert not witness.exists(), "the command ran without a sandbox"


def test_isolation_none_is_explicit_and_says_so(tmp_path):
    repo = _repo(tmp_path, {"a.txt": "a"})
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bot.settings import SandboxSettings\n"
        "from bot.validate import run_tests\n"
        "r = run_tests(Path(sys.argv[1]), 'echo hello', SandboxSettings(isolation='none'))\n"
        "print(r.ok); print(r.output)\n"
    )
    proc = _without_bwrap(tmp_path, script, repo)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:3] == [
        "True",
        "[sandbox: NONE (unsafe), host network, timeout 300s, memory 2048 MB]",
        "hello",
    ]
