"""A hostile change on the GitHub forge: the App's private key and installation tokens are
in the worker's hands, the repository's mirror holds credentials' traces, and every word
codeloop says is posted to GitHub. Whatever a test prints must reach GitHub (status comment,
pull request, pushed commits) and the store with no secret in any common encoding.

Real parts: the GitHub webhook route, the huey queue, PyGithub against the local GitHub
server backed by real git, the sandbox; the model is scripted (a fake at the Backend port).
"""

from __future__ import annotations

import base64
import logging
import subprocess

from sqlalchemy import select

from bot.demo import SAMPLE_FILES
from bot.store.models import Job, JobStage
from tests.fakes import ScriptedBackend
from tests.github_harness import make_env

FILES = {**SAMPLE_FILES,
         ".codeloop.yml": "test_command: python -m pytest -q -s\nedit_format: whole\n"}


def _answer(pem: str, tokens: list[str], home: str) -> str:
    """A test that looks for credentials where the worker keeps them, then prints the key it
    was handed (backwards in the answer, so the answer itself holds no copy) in encodings."""
    hidden = pem[::-1]
    hidden_tokens = [t[::-1] for t in tokens]
    return f'''tests/test_leak.py
```python
import base64, glob, os  # noqa: F401


def test_leak():
    found = []
    for pattern in ("{home}/mirrors/**/config", "{home}/**/*.pem", "/proc/*/environ"):
        for path in glob.glob(pattern, recursive=True):
            try:
                text = open(path, errors="replace").read()
            except OSError:
                continue
            if any(w in text.lower() for w in ("authorization", "private key", "codeloop_")):
                found.append(text)
    pem = {hidden!r}[::-1]
    tokens = [t[::-1] for t in {hidden_tokens!r}]
    print(pem)
    print(repr(pem))
    print(base64.b64encode(pem.encode()).decode())
    for t in tokens:
        print(t, base64.b64encode(t.encode()).decode(), repr(t + "\\n"))
    print("FOUND", len(found), found)
    assert False, "FOUND %d; leak attempt: " % len(found) + repr(pem) + " ".join(tokens)
```
'''


def _forms(secret: str) -> list[str]:
    forms = [secret, base64.b64encode(secret.encode()).decode(), repr(secret)[1:-1]]
    forms += [line for line in secret.splitlines() if line and not line.startswith("-----")]
    return forms


def test_a_test_that_prints_the_apps_key_and_tokens_leaks_nothing_to_github(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    backend = ScriptedBackend("the answer is set below, once the App's key exists")
    env = make_env(tmp_path, backend, files=FILES)
    try:
        pem = env.fake.private_key_pem
        backend.answers = [_answer(pem, [], str(env.settings.home))]
        settings_secrets = env.settings.secret_values()
        assert any("PRIVATE KEY" in s for s in settings_secrets)
        issue = env.fake.open_issue(env.repo, "Add a whisper(text) helper", "please", "alice")
        answer = env.deliver(
            "issues", env.fake.issue_labeled(env.repo, issue, "codeloop", "alice"), "d-leak-1")
        assert answer.status_code == 202, answer.text
        env.work()

        comments = "\n".join(c["body"] for c in env.fake.comments_on(env.repo, issue))
        assert "1 failed" in comments  # the requester was told, with the test's output
        assert env.repo.pulls == {}  # the leaking test failed: nothing was opened or pushed
        pushed = subprocess.run(["git", "log", "--all", "-p"], cwd=env.repo.path,
                                capture_output=True, text=True, check=True).stdout
        with env.runtime.store.session() as s:
            stored = [s.get(Job, 1).error or ""]
            stored += [f"{r.output} {r.error}" for r in s.scalars(select(JobStage))]
        assert "FOUND 0; leak attempt" in "\n".join(stored)  # no credential within reach
        prompts = "\n".join(m.content for call in backend.calls for m in call)
        logs = "\n".join(r.getMessage() for r in caplog.records)
        places = {"GitHub comments": comments, "pushed": pushed, "store": "\n".join(stored),
                  "prompts": prompts, "logs": logs}
        issued = list(env.fake.tokens)  # installation tokens the worker was given
        for secret in [pem.strip(), *issued]:
            for form in _forms(secret):
                for where, text in places.items():
                    assert form not in text, f"{form[:24]}… leaked into {where}"
        assert "***" in comments or "***" in "\n".join(stored)  # the output was there, masked
    finally:
        env.close()
