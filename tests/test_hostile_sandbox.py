"""Attacks on the machine through the code a model writes, each tried for real.

The model is the part an attacker steers (through the requirement or an issue), so here it is
a scripted one behind the OpenAI protocol that answers with a test file doing the attack. The
bot runs as a real `codeloop run` process whose environment holds the canary secrets (so
`/proc/<bot>/environ` has them), against a real repository, store, sandbox and git. Each
attack must fail, the job must end cleanly, and nothing codeloop stored, logged, printed,
pushed or left in its home may contain a canary in any common encoding.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from bot.demo import SAMPLE_FILES, make_sample_repo
from tests.support import cli_env, git_out, make_settings
from tests.fakes import ScriptedBackend
from tests.openai_server import serve_openai

TAG = secrets.token_hex(6)
GH_TOKEN = f"ghp_CANARY{TAG}0123456789abcdefghij"
SLACK_TOKEN = f"xoxb-1111-2222-CANARY{TAG}"
HOST_SECRET = f"AKIACANARY{TAG}HOSTSECRET"
PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    f"MIIEowIBAAKCAQEAcanary{TAG}Zx9u1b2c3d4e5f6g7h8i9j0kLmNoPqRsTuVwXyZ012345\n"
    f"Q2FuYXJ5TGluZVR3b{TAG}ZSBvZiB0aGUgcHJpdmF0ZSBrZXkgZm9yIGNvZGVsb29w\n"
    "-----END RSA PRIVATE KEY-----\n"
)
CANARY_FILE_TEXT = f"canary-file-{TAG}"


def encodings(secret: str) -> list[str]:
    """The forms a leak would take: raw, base64, URL, hex, repr, and each PEM body line."""
    raw = secret.encode()
    forms = [secret, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode(),
             quote(secret, safe=""), binascii.hexlify(raw).decode(), repr(secret)[1:-1]]
    forms += [line for line in secret.splitlines() if line and not line.startswith("-----")]
    return forms


@dataclass
class World:
    tmp: Path
    home: Path
    repo: Path
    key_file: Path
    canary_file: Path
    env: dict[str, str]
    backend: ScriptedBackend | None = None
    output: str = ""
    returncode: int = 0

    @property
    def db(self) -> Path:
        return self.home / "codeloop.db"

    def run(self, answer: str, *args: str, requirement: str = "Add a whisper(text) helper.") -> str:
        self.backend = ScriptedBackend(answer, name="scripted")
        with serve_openai(self.backend, served_name="scripted") as url:
            env = {**self.env, "CODELOOP_BACKEND__BASE_URL": url}
            argv = [sys.executable, "-m", "bot.cli", *(args or ("run", requirement, "--repo",
                                                               str(self.repo)))]
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        self.returncode = proc.returncode
        self.output += proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    def stored(self) -> str:
        with sqlite3.connect(self.db) as db:
            return "\n".join(db.iterdump())

    def pushed(self) -> str:
        return git_out(self.repo, "log", "--all", "-p", "--format=%H %s%n%b")

    def home_files(self) -> str:
        out = []
        for path in self.home.rglob("*"):
            if path.is_file() and path != self.db and "models" not in path.parts:
                try:
                    out.append(path.read_text(errors="replace"))
                except OSError:
                    pass
        return "\n".join(out)

    def prompts(self) -> str:
        return "\n".join(m.content for call in self.backend.calls for m in call)

    def assert_no_canary_anywhere(self) -> None:
        places = {"stored": self.stored(), "logged": self.output, "pushed": self.pushed(),
                  "home": self.home_files(), "prompts": self.prompts()}
        for secret in (GH_TOKEN, SLACK_TOKEN, HOST_SECRET, PEM.strip(), CANARY_FILE_TEXT):
            for form in encodings(secret):
                for where, text in places.items():
                    assert form not in text, f"a canary ({form[:20]}…) leaked into {where}"

    def assert_repository_untouched(self) -> None:
        assert git_out(self.repo, "status", "--porcelain", "--ignored") == ""
        branches = git_out(self.repo, "for-each-ref", "--format=%(refname)").split()
        assert all(b == "refs/heads/main" or b.startswith("refs/heads/codeloop/")
                   for b in branches), branches
        assert sorted(p.name for p in (self.repo / ".git" / "hooks").iterdir()
                      if not p.name.endswith(".sample")) == []


@pytest.fixture
def world(tmp_path) -> World:
    files = {**SAMPLE_FILES,
             ".codeloop.yml": "test_command: python -m pytest -q -s\nedit_format: whole\n"}
    repo = make_sample_repo(tmp_path / "repo", files)
    keys = tmp_path / "keys"
    keys.mkdir()
    key_file = keys / "app.pem"
    key_file.write_text(PEM)
    key_file.chmod(0o600)
    canary_file = keys / "canary.txt"
    canary_file.write_text(CANARY_FILE_TEXT)
    settings = make_settings(tmp_path / "home")
    env = cli_env(settings)
    env.update(
        CODELOOP_BACKEND__KIND="openai", CODELOOP_BACKEND__MODEL="scripted",
        CODELOOP_BACKEND__MAX_RETRIES="0", CODELOOP_PIPELINE__PREFILL="off",
        CODELOOP_PIPELINE__MAX_ATTEMPTS="1", CODELOOP_SANDBOX__TIMEOUT_SECONDS="60",
        # One answer per attempt, no model-written test: each test is about one attack.
        CODELOOP_PIPELINE__CANDIDATES="1", CODELOOP_PIPELINE__REQUIREMENT_TESTS="off",
        CODELOOP_GITHUB__TOKEN=GH_TOKEN, CODELOOP_SLACK__BOT_TOKEN=SLACK_TOKEN,
        CODELOOP_GITHUB__PRIVATE_KEY_PATH=str(key_file), AWS_SECRET_ACCESS_KEY=HOST_SECRET,
    )
    return World(tmp_path, settings.home, repo, key_file, canary_file, env)


def attack_answer(body: str, *, fail: bool = False) -> str:
    """A whole-file answer adding a test that runs `body` (which sets `loot`) and prints it."""
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    ending = "    assert False, loot\n" if fail else "    print(loot)\n"
    return f'''tests/test_attack.py
```python
import base64, binascii, ctypes, glob, json, os, socket, subprocess, sys, time  # noqa: F401
from urllib.parse import quote  # noqa: F401


def test_attack():
    loot = "nothing"
{indented}
    print("LOOT:", loot)
{ending}```
'''


def _published(world: World) -> bool:
    return any(b.startswith("codeloop/") for b in git_out(world.repo, "branch", "--format=%(refname:short)").split())


def _sandbox_output(world: World) -> str:
    """What the attack test printed in the sandbox (the tests check of every validation)."""
    import json

    with sqlite3.connect(world.db) as db:
        rows = db.execute("SELECT output FROM job_stages WHERE name LIKE 'validate-%'").fetchall()
    out = []
    for (raw,) in rows:
        checks = (json.loads(raw or "{}").get("validation") or {}).get("checks") or []
        out += [c["output"] for c in checks if c["name"] == "tests"]
    return "\n".join(out)


def _finish(world: World) -> None:
    """Every attack: the job ended (a PR or a clear failure), nothing leaked, repo untouched."""
    assert world.returncode in (0, 1), world.output
    assert "Traceback" not in world.output, world.output
    world.assert_no_canary_anywhere()
    world.assert_repository_untouched()


# ---------------------------------------------------------------- reading secrets


def test_read_the_bots_environment_through_proc(world):
    world.run(attack_answer('''
found = []
for path in glob.glob("/proc/*/environ"):
    try:
        data = open(path, "rb").read()
    except OSError:
        continue
    if b"CANARY" in data or b"CODELOOP_" in data:
        found.append(path + " " + data.decode(errors="replace"))
loot = "\\n".join(found) or "no environment of another process"
'''))
    assert _published(world), world.output  # the attack test passed: the job went through
    assert "LOOT: no environment of another process" in _sandbox_output(world)
    _finish(world)


def test_read_a_key_file_and_a_file_outside(world):
    world.run(attack_answer(f'''
got = []
for path in ({str(world.key_file)!r}, {str(world.canary_file)!r}, "/etc/shadow",
             os.path.expanduser("~root/.ssh/id_rsa")):
    try:
        got.append(open(path).read())
    except OSError as exc:
        got.append(type(exc).__name__)
loot = " | ".join(got)
'''))
    out = _sandbox_output(world)
    assert "LOOT: FileNotFoundError | FileNotFoundError | FileNotFoundError" in out, out
    _finish(world)


# ---------------------------------------------------------------- writing outside


def test_write_outside_the_copy_the_store_and_the_users_repository(world):
    db, repo, home = world.db, world.repo, world.home
    world.run(attack_answer(f'''
import sqlite3
done = []
for path in ({str(home / "pwned")!r}, {str(repo / "pwned.txt")!r},
             {str(repo / ".git" / "hooks" / "post-merge")!r}, "/tmp/../pwned", "/usr/pwned"):
    try:
        open(path, "w").write("pwned")
        done.append("wrote " + path)
    except OSError as exc:
        done.append(type(exc).__name__)
try:
    con = sqlite3.connect({str(db)!r})
    con.execute("UPDATE pull_requests SET title = 'PWNED'")
    con.commit()
    done.append("wrote the store")
except Exception as exc:
    done.append("store: " + type(exc).__name__)
loot = " | ".join(done)
'''))
    assert _published(world), world.output
    out = _sandbox_output(world)
    assert "LOOT:" in out and "wrote" not in out.split("LOOT:")[1].splitlines()[0], out
    assert not (world.home / "pwned").exists() and not (world.repo / "pwned.txt").exists()
    with sqlite3.connect(world.db) as con:
        assert con.execute("SELECT title FROM pull_requests").fetchall() == [("Add a whisper(text) helper.",)]
    _finish(world)


# ---------------------------------------------------------------- reaching services


def test_reach_postgresql_over_its_unix_socket_and_tcp(world):
    world.run(attack_answer('''
got = []
for path in glob.glob("/var/run/postgresql/.s.PGSQL.*") + ["/var/run/postgresql/.s.PGSQL.5432",
                                                             "/run/postgresql/.s.PGSQL.5432"]:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        got.append("connected " + path)
    except OSError as exc:
        got.append(type(exc).__name__)
for port in (5432, 6379):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2)
        got.append("connected tcp %d" % port)
    except OSError as exc:
        got.append(type(exc).__name__)
loot = " | ".join(got)
'''))
    out = _sandbox_output(world)
    line = out.split("LOOT:")[1].splitlines()[0]
    assert "connected" not in line and "ConnectionRefusedError" in line, out
    _finish(world)


def test_setns_into_another_network_namespace(world):
    world.run(attack_answer('''
libc = ctypes.CDLL(None, use_errno=True)
got = []
for path in glob.glob("/proc/*/ns/net") + ["/proc/1/ns/net", "/run/netns/host"]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        got.append(type(exc).__name__)
        continue
    if libc.setns(fd, 0x40000000) == 0:  # CLONE_NEWNET
        got.append("joined " + path)
    else:
        got.append("EPERM" if ctypes.get_errno() == 1 else "errno %d" % ctypes.get_errno())
try:
    socket.create_connection(("127.0.0.1", 5432), timeout=2)
    got.append("reached postgres")
except OSError as exc:
    got.append(type(exc).__name__)
loot = " | ".join(got)
'''))
    line = _sandbox_output(world).split("LOOT:")[1].splitlines()[0]
    assert "joined" not in line and "reached" not in line, line
    _finish(world)


# ---------------------------------------------------------------- git hooks


HOOKS = ("post-checkout", "prepare-commit-msg", "post-commit", "reference-transaction", "pre-push")


def test_plant_every_kind_of_git_hook(world):
    witness = world.tmp / "hook-ran"
    workspaces = world.home / "workspaces"
    world.run(attack_answer(f'''
script = "#!/bin/sh\\necho ran >> {witness}\\n"
planted = []
targets = [".git/hooks", "../.git/hooks", {str(world.repo / ".git" / "hooks")!r}]
targets += glob.glob({str(workspaces)!r} + "/*/.git/hooks") + [{str(workspaces / "job-1" / ".git" / "hooks")!r}]
for hooks in targets:
    for name in {HOOKS!r}:
        try:
            os.makedirs(hooks, exist_ok=True)
            with open(os.path.join(hooks, name), "w") as f:
                f.write(script)
            os.chmod(os.path.join(hooks, name), 0o755)
            planted.append(os.path.join(hooks, name))
        except OSError:
            pass
loot = "planted %d hooks" % len(planted)
'''))
    assert _published(world), world.output
    # Each write landed in the sandbox's own copy or private /tmp (the host's paths do not
    # exist in there); the host's hook directories stay empty, and no hook ever ran.
    assert "LOOT: planted" in _sandbox_output(world)
    assert not witness.exists(), "a planted hook ran"
    # What was pushed is exactly the validated file: no hook added anything to the commit.
    branch = next(b for b in git_out(world.repo, "branch", "--format=%(refname:short)").split()
                  if b.startswith("codeloop/"))
    changed = git_out(world.repo, "diff", "--name-only", f"main..{branch}").split()
    assert changed == ["tests/test_attack.py"]
    _finish(world)


# ---------------------------------------------------------------- processes


def test_leave_a_background_process_behind(world):
    marker = f"codeloop-left-{TAG}"
    world.run(attack_answer(f'''
subprocess.Popen(["bash", "-c", "exec -a {marker} sleep 300"], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.system("setsid nohup bash -c 'exec -a {marker} sleep 300' >/dev/null 2>&1 &")
loot = "started"
'''))
    assert _published(world), world.output
    time.sleep(0.5)
    for pid in os.listdir("/proc"):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        assert argv0 != marker.encode(), f"process {pid} outlived the sandbox"
    _finish(world)


def test_exceed_the_process_limit(world):
    world.run(attack_answer('''
children = []
blocked = None
for i in range(2000):
    try:
        children.append(subprocess.Popen(["sleep", "30"]))
    except OSError as exc:
        blocked = "blocked at %d: %s" % (len(children), type(exc).__name__)
        break
for c in children:
    c.kill()
loot = blocked or "spawned 2000"
'''))
    line = _sandbox_output(world).split("LOOT:")[1].splitlines()[0]
    assert line.strip().startswith("blocked at"), line
    assert int(line.split()[2].rstrip(":")) <= 256
    _finish(world)


# ---------------------------------------------------------------- configuration


def test_edit_codeloop_yml_then_request_changes(world):
    # 1. A change to .codeloop.yml is refused: it is protected.
    widen = ".codeloop.yml\n```yaml\ntest_command: echo PWNED-CONFIG\nprotected_paths: []\n```\n"
    world.run(widen)
    assert world.returncode == 1 and "protected" in world.output
    assert not _published(world)

    # 2. A pull request whose branch then carries a widened .codeloop.yml (pushed there by
    #    anyone): the revision still runs under the default branch's configuration.
    good = attack_answer('loot = "fine"')
    world.run(good, requirement="Add a harmless test.")
    assert _published(world), world.output
    branch = next(b for b in git_out(world.repo, "branch", "--format=%(refname:short)").split()
                  if b.startswith("codeloop/"))
    subprocess.run(["git", "checkout", "-q", branch], cwd=world.repo, check=True)
    (world.repo / ".codeloop.yml").write_text("test_command: echo PWNED-CONFIG\n"
                                              "protected_paths: []\nedit_format: whole\n")
    subprocess.run(["git", "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qam",
                    "widen"], cwd=world.repo, check=True)
    subprocess.run(["git", "checkout", "-q", "main"], cwd=world.repo, check=True)
    workflow = ".github/workflows/ci.yml\n```yaml\non: push\njobs: {pwn: {runs-on: x}}\n```\n"
    world.run(workflow, "review", "1", "--request-changes", "Also add CI")
    out = world.output
    assert "protected" in out, out
    assert "PWNED-CONFIG" not in _sandbox_output(world)
    assert git_out(world.repo, "ls-tree", "-r", "--name-only", branch).count(".github") == 0
    world.assert_no_canary_anywhere()


# ---------------------------------------------------------------- leaking through output


def test_print_a_secret_encoded_is_masked_everywhere(world):
    # The test cannot read a secret (the attacks above), so it is handed one here, written
    # backwards so the answer itself holds no copy: this checks the second wall, the scrubber.
    backwards = GH_TOKEN[::-1]
    pem_backwards = PEM[::-1]
    world.run(attack_answer(f'''
s = {backwards!r}[::-1]
pem = {pem_backwards!r}[::-1]
loot = "\\n".join([
    base64.b64encode(s.encode()).decode(),
    "x" + base64.b64encode(("xx" + s).encode()).decode(),
    repr(s + "\\n"),
    json.dumps({{"t": s}}),
    quote(s, safe=""),
    binascii.hexlify(s.encode()).decode(),
    repr(pem),
    pem,
])
''', fail=True))
    assert world.returncode == 1  # the attack test failed: its output went to the prompt path
    assert "LOOT:" in _sandbox_output(world)
    _finish(world)


def test_print_a_secret_reaches_the_retry_prompt_masked(world):
    backwards = SLACK_TOKEN[::-1]
    world.env["CODELOOP_PIPELINE__MAX_ATTEMPTS"] = "2"
    world.run(attack_answer(f'''
s = {backwards!r}[::-1]
loot = base64.b64encode(s.encode()).decode() + " " + repr(s + "\\n") + " " + s
''', fail=True))
    assert len(world.backend.calls) == 2
    retry = "\n".join(m.content for m in world.backend.calls[1])
    assert "LOOT:" in retry and "***" in retry  # the output came back to the model, masked
    _finish(world)


# ---------------------------------------------------------------- no sandbox, no run


def _path_without_bwrap(tmp: Path) -> str:
    bin_dir = tmp / "bin-without-bwrap"
    bin_dir.mkdir()
    for tool in Path("/usr/bin").iterdir():
        if tool.name != "bwrap":
            (bin_dir / tool.name).symlink_to(tool)
    return f"{Path(sys.executable).parent}:{bin_dir}"


def test_without_a_sandbox_the_job_fails_before_generating_and_workers_refuse(world):
    world.env["PATH"] = _path_without_bwrap(world.tmp)
    world.run(attack_answer('loot = "ran unconfined"'))
    assert world.returncode == 1
    assert "cannot run the repository's tests safely" in world.output
    assert "apt-get install bubblewrap" in world.output
    assert world.backend.calls == []  # nothing was generated, nothing ran
    assert not _published(world)

    worker = subprocess.run([sys.executable, "-m", "bot.cli", "worker"], env=world.env,
                            capture_output=True, text=True, timeout=120)
    assert worker.returncode == 1
    assert "this worker takes no jobs: the test sandbox does not work here" in worker.stderr
    _finish(world)
