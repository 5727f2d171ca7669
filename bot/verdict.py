"""The verdict: what validation proved about a change, in words a reviewer can weigh.

One renderer for every place a result is shown (the pull request body, the GitHub status
comment, the Slack thread, ``codeloop show``), so they never disagree. It never says a bare
"tests: passed" when nothing checked the change: a change no test executed says so.
"""

from __future__ import annotations

import re

NOTHING_EXERCISED = "no test exercises the new code"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def existing_tests(validation: dict) -> str:
    """"existing tests: 41 passed" (pytest's own counts), or what happened instead."""
    for check in validation.get("checks", []):
        if check.get("name") != "tests":
            continue
        if check.get("skipped"):
            return "existing tests: none (no test command)"
        out = check.get("output", "")
        counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", out)
        if counts:
            last: dict[str, str] = {}
            for n, word in counts:  # pytest's summary line is the last one
                last[word] = n
            shown = ", ".join(f"{n} {w}" for w, n in last.items())
            return f"existing tests: {shown}"
        if re.search(r"no tests ran", out):
            return "existing tests: none ran"
        return f"existing tests: {'passed' if check.get('ok') else 'FAILED'}"
    return "existing tests: not run"


def requirement_tests(proof: dict) -> str:
    kept = proof.get("requirement_tests", [])
    if not kept:
        return "requirement tests: none"
    origins = {"example": 0, "model": 0}
    for k in kept:
        origins[k.get("origin", "model")] = origins.get(k.get("origin", "model"), 0) + 1
    where = []
    if origins["example"]:
        where.append(f"{origins['example']} from the requirement's examples")
    if origins["model"]:
        where.append(f"{origins['model']} written by the model")
    passed = sum(1 for k in kept if k.get("change") == "passed")
    outcome = "fail → pass" if passed == len(kept) else f"{passed}/{len(kept)} pass with the change"
    return f"requirement tests: {_count(len(kept), 'test')} added ({', '.join(where)}), {outcome}"


def coverage(proof: dict) -> str | None:
    cov = proof.get("coverage") or {}
    if not cov.get("measured"):
        return None
    return f"new lines executed: {cov['executed']}/{cov['executable']}"


def exercised(proof: dict | None) -> bool | None:
    """Whether any test ran the change (None: unknown, e.g. coverage not measured)."""
    if not proof:
        return None
    if any(k.get("change") == "passed" for k in proof.get("requirement_tests", [])):
        return True
    cov = proof.get("coverage") or {}
    if cov.get("measured"):
        return cov.get("executed", 0) > 0 or cov.get("executable", 0) == 0
    return None


def line(validation: dict) -> str:
    """One line: the verdict shown everywhere."""
    if not validation:
        return "not validated"
    checks = {c.get("name"): c for c in validation.get("checks", [])}
    failed = [n for n, c in checks.items() if not c.get("ok") and not c.get("skipped")]
    proof = validation.get("proof")
    parts: list[str] = []
    if failed:
        parts.append("FAILED: " + ", ".join(failed))
    if proof is not None:
        parts.append(requirement_tests(proof))
    parts.append(existing_tests(validation))
    if proof is not None:
        cov = coverage(proof)
        if cov:
            parts.append(cov)
    text = "; ".join(parts)
    if not failed:
        ran = exercised(proof)
        if ran is False:
            text = f"{NOTHING_EXERCISED} ({text})"
        elif ran is None and proof is None:
            text += " (requirement tests and coverage were not measured)"
        elif ran is None:
            text += " (the new lines' coverage was not measured)"
    return text


def code_block(text: str) -> str:
    """Text shown as written in Markdown: a fence longer than any run of backticks inside it,
    so no output line can end the block (and nothing in it is a heading, a comment or an
    @mention)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def markdown(validation: dict) -> str:
    """The pull request body's validation section: the line, then each test and its origin."""
    head = f"**{'passed' if validation.get('ok') else 'failed'}** — {line(validation)}"
    out = [head]
    proof = validation.get("proof") or {}
    kept = proof.get("requirement_tests", [])
    if kept:
        out.append("")
        out.append("Requirement tests (they fail at the start commit and pass with this change):")
        for k in kept:
            src = ("from the requirement's example" if k.get("origin") == "example"
                   else "written by the model — check that it tests what was asked")
            stated = f": `{k['stated']}`" if k.get("stated") else ""
            out.append(f"- `{k['id']}` — {src}{stated} "
                       f"(start: {k.get('start', '?')}, change: {k.get('change', '?')})")
    for d in proof.get("discarded", []):
        out.append(f"- discarded `{d['id']}` ({d.get('origin', '?')}): {d['reason']}")
    cov = proof.get("coverage") or {}
    if cov.get("measured") and cov.get("missed"):
        missed = "; ".join(f"{p}: {', '.join(map(str, ls[:20]))}"
                           for p, ls in cov["missed"].items())
        out.append(f"\nChanged lines no test executed: {missed}")
    elif not cov.get("measured") and cov.get("reason"):
        out.append(f"\nChanged-line coverage: not measured ({cov['reason']}).")
    for note in proof.get("notes", []):
        out.append(f"\nNote: {note}")
    return "\n".join(out)
