"""The check: each requirement test must fail at the start commit (the behaviour is missing)
and pass with the change; plus the coverage of the changed lines by the same runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bot import changed_lines
from bot.reqtests.examples import Example, example_test_file, is_test_code
from bot.reqtests.runner import failure_kind, run_in_sandbox, suite_args
from bot.settings import SandboxSettings

# Exceptions that mean "the behaviour is not there yet"; anything else (a syntax error in
# the test, a type error) means the test itself is broken.
FAIL_KINDS = ("AssertionError", "ImportError", "ModuleNotFoundError", "NameError",
              "AttributeError")


def prove(
    workdir: Path, start_sha: str, apply: callable, changed: Sequence[str],
    *, examples: Sequence[Example], model_test: dict | None, test_command: str | None,
    settings: SandboxSettings, secrets: Sequence[str] = (), env_dir: Path | None = None,
) -> dict:
    """Fail-at-start / pass-with-change for the requirement tests, plus changed-line coverage.

    ``apply()`` puts the candidate's change on the working tree (after a reset to
    ``start_sha``). Returns the ``proof`` record the verdict renders; ``proof["ok"]`` is
    False when a kept requirement test fails with the change.
    """
    from bot import workspace

    files: dict[str, str] = {}  # path -> text
    origin: dict[str, str] = {}  # test id or path -> "example" | "model"
    stated: dict[str, str] = {}
    made = example_test_file(workdir, examples, changed)
    if made:
        path, text, stated = made
        files[path] = text
        origin[path] = "example"
    if model_test and model_test.get("path") and model_test["path"] not in files:
        files[model_test["path"]] = model_test["text"]
        origin[model_test["path"]] = "model"
    proof: dict = {"ok": True, "requirement_tests": [], "discarded": [], "files": {},
                   "notes": []}
    if examples and not made:
        proof["notes"].append("the requirement's examples call functions the change does not "
                              "define")

    kept: list[dict] = []
    if files:
        # 1. At the start commit: each test must fail for want of the behaviour.
        workspace.reset(workdir, start_sha)
        for path, text in files.items():
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).write_text(text)
        before = run_in_sandbox(workdir, list(files), settings, secrets, env_dir=env_dir)
        workspace.reset(workdir, start_sha)
        if not before.ok:
            proof["notes"].append(f"requirement tests could not run at the start commit: "
                                  f"{before.problem}")
        collect_failed: dict[str, str] = {}
        for t in before.tests:
            path = t["id"].split("::", 1)[0]
            src = origin.get(path, "model")
            if t["id"].endswith("::<collection>"):
                kind = failure_kind(t["message"])
                if kind in ("ImportError", "ModuleNotFoundError", "NameError", "AttributeError"):
                    collect_failed[path] = kind
                else:
                    proof["discarded"].append({"id": path, "origin": src, "reason":
                                               f"broken at the start commit ({kind})"})
                continue
            entry = {"id": t["id"], "origin": src, "stated": stated.get(t["id"], "")}
            if t["state"] == "passed":
                proof["discarded"].append({**entry, "reason": "passes at the start commit: it "
                                           "does not test the change"})
            elif t["state"] == "skipped":
                proof["discarded"].append({**entry, "reason": "skipped"})
            else:
                kind = failure_kind(t["message"])
                if kind in FAIL_KINDS:
                    kept.append({**entry, "start": kind})
                else:
                    proof["discarded"].append({**entry, "reason": f"broken at the start "
                                               f"commit ({kind})"})
        keep_files = {k["id"].split("::", 1)[0] for k in kept} | set(collect_failed)
        files = {p: t for p, t in files.items() if p in keep_files}
    else:
        collect_failed = {}

    # 2. With the change: the kept tests must pass; measure the changed lines meanwhile.
    workspace.reset(workdir, start_sha)
    apply()
    for path, text in files.items():
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).write_text(text)
    lines = changed_lines.changed_lines(workdir, start_sha, [
        p for p in changed if p.endswith(".py") and not is_test_code(p)])
    suite = suite_args(test_command)
    after = run_in_sandbox(workdir, list(files), settings, secrets, changed=lines or None,
                           suite=suite, env_dir=env_dir) if (files or lines) else None
    by_id = {t["id"]: t for t in (after.tests if after else [])}
    for path, kind in collect_failed.items():  # a file that could not even import at start
        for tid in by_id:
            if tid.startswith(path + "::") and not tid.endswith("::<collection>"):
                kept.append({"id": tid, "origin": origin.get(path, "model"), "stated": "",
                             "start": kind})
    for k in kept:
        t = by_id.get(k["id"])
        if t is None:
            collected = by_id.get(k["id"].split("::", 1)[0] + "::<collection>")
            k["change"] = "error"
            k["message"] = (collected or {}).get("message", "did not run")[-800:]
        else:
            k["change"] = t["state"]
            if t["state"] != "passed":
                k["message"] = t["message"][-800:]
    # A stated example that fails rejects the change. A test the model wrote may itself be
    # wrong, so when it fails with the change it is reported and dropped (with its file),
    # not used to reject: it only ranks candidates when it passes.
    doubtful = {k["id"].split("::", 1)[0] for k in kept
                if k["origin"] == "model" and k["change"] != "passed"}
    for k in kept:
        if k["id"].split("::", 1)[0] in doubtful:
            reason = ("fails with the change too: the model's test may be wrong, so it was not "
                      "kept" if k["change"] != "passed" else
                      "dropped with its file, where another test failed with the change")
            proof["discarded"].append({"id": k["id"], "origin": k["origin"], "reason": reason,
                                       "message": k.get("message", "")[-400:]})
    kept = [k for k in kept if k["id"].split("::", 1)[0] not in doubtful]
    files = {p: t for p, t in files.items() if p not in doubtful}
    proof["requirement_tests"] = kept
    proof["ok"] = all(k["change"] == "passed" for k in kept)
    proof["files"] = files if proof["ok"] else {}
    if after is not None and not after.ok:
        proof["notes"].append(f"the requirement test run: {after.problem}")
    proof["coverage"] = changed_lines.summarise(lines, after.coverage if after else None,
                                                suite is not None)
    if after is not None and not proof["ok"]:
        proof["output"] = after.output[-2000:]
    workspace.reset(workdir, start_sha)
    return proof


def failures_text(proof: dict) -> str:
    """What the model reads when a requirement test failed with its change."""
    parts = []
    for k in proof.get("requirement_tests", []):
        if k.get("change") != "passed":
            what = f" (the requirement says: {k['stated']})" if k.get("stated") else ""
            parts.append(f"## requirement test {k['id']}{what}\n{k.get('message', '')}")
    return "\n\n".join(parts)[-3000:]
