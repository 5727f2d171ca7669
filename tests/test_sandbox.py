"""bot.sandbox directly: the self-test that `codeloop doctor` prints, and what the sandbox
looks like from inside."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bot.sandbox import run_sandboxed, self_test
from bot.sandbox.command import python_roots
from bot.scrub import Scrubber, variants
from bot.settings import SandboxSettings


def test_self_test_blocks_every_escape_here():
    result = self_test(SandboxSettings())
    assert result.error is None
    assert len(result.attempts) == 11
    escaped = [(name, detail) for name, blocked, detail in result.attempts if not blocked]
    assert escaped == [] and result.ok


def test_self_test_sees_escapes_when_nothing_confines_the_probe():
    """The same probe run unconfined must report escapes, or the check above proves nothing."""
    unconfined = SandboxSettings(isolation="none")
    result = self_test(unconfined, run=lambda cmd, work, s, timeout: run_sandboxed(
        cmd, work, s, timeout=timeout))
    escaped = {name for name, blocked, _ in result.attempts if not blocked}
    assert not result.ok
    assert {"read a file outside the copy", "read another process's environment",
            "connect to a Unix socket", "open a TCP connection",
            "leave a process behind", "reach this host's services from a set-up step"} <= escaped
    if os.geteuid() == 0:
        assert "write outside the copy" in escaped


def test_inside_the_sandbox(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "mine.txt").write_text("mine\n")
    command = (
        "id -u; hostname; cat mine.txt; echo changed > mine.txt; ls /; "
        "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ls /proc | grep -c '^[0-9]'; "
        "test -w /usr && echo usr-writable; test -e /run/postgresql && echo run-visible; "
        "touch /tmp/x $HOME/y && echo tmp-home-writable"
    )
    result = run_sandboxed(command, work, SandboxSettings(timeout_seconds=30))
    assert result.ok, result.output
    lines = result.output.splitlines()
    uid = SandboxSettings().uid
    if os.geteuid() == 0:  # a host uid of its own from the configured range
        assert uid <= int(lines[0]) < uid + 1024
    assert lines[1] == "codeloop-sandbox" and lines[2] == "mine"
    root = set(lines[3:lines.index(next(x for x in lines if x.startswith("CapEff")))])
    # The system's directories, the copy, and the top of codeloop's own Python installation
    # (bound read-only wherever the host keeps it: /root/.pyenv here, /check/... in CI).
    python_tops = {Path(p).parts[1] for p in python_roots()}
    assert root <= {"bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "proc",
                    "sbin", "tmp", "usr", "workspace"} | python_tops, root
    assert "run" not in root and "var" not in root and "srv" not in root
    assert "CapEff:\t0000000000000000" in lines and "CapBnd:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    assert int(lines[lines.index("NoNewPrivs:\t1") + 1]) <= 4  # only the sandbox's processes
    assert "usr-writable" not in lines and "run-visible" not in lines
    assert "tmp-home-writable" in lines
    assert (work / "mine.txt").read_text() == "changed\n"  # the copy is the writable place
    assert os.stat(work / "mine.txt").st_uid == os.getuid()  # handed back to the bot's user


def test_a_sandbox_filling_its_process_limit_does_not_starve_another(tmp_path):
    import threading

    hog_dir, other_dir = tmp_path / "hog", tmp_path / "other"
    hog_dir.mkdir()
    other_dir.mkdir()
    settings = SandboxSettings(timeout_seconds=60)
    results = {}

    def hog():
        results["hog"] = run_sandboxed(
            "python -c \"import subprocess, time\nkids = []\ntry:\n"
            "    for _ in range(400): kids.append(subprocess.Popen(['sleep', '6']))\n"
            "except OSError: print('full at', len(kids), flush=True)\ntime.sleep(5)\"",
            hog_dir, settings)

    thread = threading.Thread(target=hog)
    thread.start()
    time.sleep(2.5)
    other = run_sandboxed("for i in $(seq 1 40); do sleep 0.5 & done; wait; echo fine",
                          other_dir, settings)
    thread.join()
    assert "full" in results["hog"].output  # the hog hit its own limit…
    assert other.ok and "fine" in other.output  # …and the other sandbox forked freely
    assert "Resource temporarily unavailable" not in other.output


def test_timeout_and_output_tail(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    result = run_sandboxed("yes line 2>/dev/null | head -c 5000000; sleep 30", work,
                           SandboxSettings(), timeout=2)
    assert result.timed_out and result.returncode is None and not result.ok
    assert result.output_bytes == 5_000_000
    assert len(result.output) <= 64 * 1024 and result.output.endswith("line\n")


def test_scrubber_masks_common_encodings():
    import base64
    import json
    from urllib.parse import quote

    secret = "ghp_0123456789abcdefghijKLMNOP"
    pem = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEAabcdefghijklmnop\nQ2FuYXJ5TGluZVR3bzEyMzQ1Njc4\n-----END KEY-----"
    scrub = Scrubber([secret, pem])
    leaks = [
        secret, base64.b64encode(secret.encode()).decode(),
        base64.b64encode(b"x" + secret.encode()).decode(),
        base64.b64encode(b"xy" + secret.encode() + b"z").decode(),
        base64.urlsafe_b64encode(secret.encode()).decode(), quote(secret, safe=""),
        secret.encode().hex(), repr(pem), json.dumps(pem), pem.splitlines()[1],
        pem.splitlines()[2], "prefix:" + secret + ":suffix",
    ]
    for leak in leaks:
        masked = scrub(f"before {leak} after")
        assert secret not in masked and "MIIEowIBAAKCAQEA" not in masked, (leak, masked)
        assert "***" in masked
    # Base64 of a secret inside a longer text keeps no stretch of the secret's own encoding.
    encoded = base64.b64encode(b"user=" + secret.encode() + b";").decode()
    core = base64.b64encode(secret.encode()[1:]).decode()[4:20]
    assert core not in scrub(encoded)
    assert scrub("nothing secret here") == "nothing secret here"
    assert len(variants("abcd")) >= 1 and Scrubber([])("abcd plain") == "abcd plain"


def test_secret_never_enters_the_sandbox_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secretvalue")
    work = tmp_path / "w"
    work.mkdir()
    result = run_sandboxed("env; cat /proc/1/environ | tr '\\0' '\\n'", work, SandboxSettings())
    assert "ghp_secretvalue" not in result.output and "GITHUB_TOKEN" not in result.output
    assert Path("/proc/self/environ").exists()


def test_read_only_paths_under_tmp_stay_visible(tmp_path):
    """A clone (and its virtualenv) may live under /tmp on the host, as CI's does: the
    sandbox's private /tmp must not hide what is bound read-only beneath it."""
    tool = tmp_path / "toolchain"
    tool.mkdir()
    (tool / "VERSION").write_text("1.2.3\n")
    work = tmp_path / "w"
    work.mkdir()
    settings = SandboxSettings(read_only_paths=[tool])
    result = run_sandboxed(f"cat {tool}/VERSION; touch {tool}/x || echo read-only; "
                           "ls /tmp | wc -l", work, settings)
    assert result.ok, result.output
    lines = result.output.splitlines()
    assert lines[0] == "1.2.3" and "read-only" in lines
    assert not (tool / "x").exists()


def test_the_processes_of_a_sandbox_share_one_memory_limit(tmp_path):
    """Four processes of 150 MB each stay under the per-process limit (300 MB); together they
    pass the sandbox's 400 MB, and the control group stops them — the host's memory is not the
    sandbox's to take. With room for all four, all four hold their memory."""
    from bot.sandbox.cgroup import placement

    where, why = placement()
    if where is None:
        import pytest

        pytest.skip(f"this host gives codeloop no control group: {why}")
    work = tmp_path / "w"
    work.mkdir()
    hog = ("for i in 1 2 3 4; do python3 -c 'import time; x = bytearray(150 << 20); "
           "x[::4096] = b\"a\" * len(x[::4096]); time.sleep(2); print(\"held\")' & done; wait")
    tight = run_sandboxed(hog, work, SandboxSettings(memory_mb=300, total_memory_mb=400,
                                                     timeout_seconds=60))
    assert tight.cgroup and tight.memory_exceeded
    assert tight.output.splitlines().count("held") < 4
    assert "stopped at its memory limit of 400 MB" in tight.output
    roomy = run_sandboxed(hog, work, SandboxSettings(memory_mb=300, total_memory_mb=1024,
                                                     timeout_seconds=60))
    assert roomy.output.splitlines().count("held") == 4 and not roomy.memory_exceeded, roomy.output
