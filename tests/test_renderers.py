"""The pure renderers, read as their readers read them: the pull request body and the GitHub
status comments as GitHub shows Markdown (parsed with a CommonMark parser), the Slack
messages as Slack reads mrkdwn. Inputs are the records the pipeline builds: a
`ValidationResult` serialised by the pipeline, the proof record of bot.reqtests with
changed-line coverage from bot.changed_lines, the result dict of a published job."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

import hypothesis
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from bot import jobs, verdict
from bot.changed_lines import summarise
from bot.github.notifier import render_finished, render_reply, render_status
from bot.pipeline import pr_body
from bot.pipeline.candidates import validation_json
from bot.ports import CheckResult, ValidationResult
from bot.slack import messages
from bot.slack.events import CANCEL_ACTION, RETRY_ACTION
from bot.slack.handler import status_text
from bot.slack.messages import JobView, StageLine
from bot.store.db import Store
from tests.support import make_settings

# ---------------------------------------------------------------- inputs as the pipeline makes them

PASSED = "tests/test_textutil.py ..                                    [100%]\n2 passed in 0.31s"

# What a failing run of a Markdown tool's test suite prints: the captured output starts a line
# with an HTML comment, and the assertion diff holds a fenced block.
MARKDOWN_SUITE_FAILED = """\
tests/test_render.py F.                                                   [100%]
=================================== FAILURES ===================================
_________________________________ test_toc _____________________________________

    def test_toc():
>       assert render("# T") == "```\\n# T\\n```"
E       AssertionError: assert '# T' == '```\\n# T\\n```'

----------------------------- Captured stdout call -----------------------------
<!-- toc -->
```
# T
=========================== short test summary info ============================
FAILED tests/test_render.py::test_toc - AssertionError
========================= 1 failed, 1 passed in 0.05s =========================="""


def validation(tests_output: str = PASSED, *, ok: bool = True, proof: dict | None = None) -> dict:
    """The validation record as bot.pipeline stores it for one candidate."""
    result = ValidationResult(ok=ok, checks=(
        CheckResult("syntax", True, "", 0.01),
        CheckResult("ruff", True, "", 0.2),
        CheckResult("tests", ok, tests_output, 1.5),
    ))
    out = validation_json(result)
    if proof is not None:
        out["proof"] = proof
        out["ok"] = ok and proof["ok"]
    out["verdict"] = verdict.line(out)
    return out


def proof(kept=(), discarded=(), coverage=None, notes=()) -> dict:
    """The proof record of bot.reqtests.prove."""
    kept = list(kept)
    return {"ok": all(k["change"] == "passed" for k in kept), "requirement_tests": kept,
            "discarded": list(discarded), "files": {}, "notes": list(notes),
            "coverage": coverage}


EXAMPLE_TEST = {"id": "tests/test_requirement_count_vowels.py::test_example_1",
                "origin": "example", "stated": "count_vowels('Hello World') == 3",
                "start": "ImportError", "change": "passed"}
MODEL_TEST = {"id": "tests/test_requirement_count_vowels.py::test_empty", "origin": "model",
              "stated": "", "start": "AssertionError", "change": "passed"}
CHANGED = {"textutil.py": [14, 15]}
ALL_RAN = summarise(CHANGED, {"textutil.py": [[14, 15], [14, 15]]}, suite=True)
NONE_RAN = summarise(CHANGED, {"textutil.py": [[14, 15], []]}, suite=True)
DIFF_STAT = " textutil.py | 4 ++++\n 1 file changed, 4 insertions(+)"
REQUIREMENT = ('Add a function count_vowels(text) to textutil.py that returns how many vowels '
               'the text contains.\nFor example, count_vowels("Hello World") returns 3.')


def body(**overrides) -> str:
    args = dict(requirement=REQUIREMENT, requester="alice", source="github", request_id=7,
                validation=validation(proof=proof([EXAMPLE_TEST, MODEL_TEST], coverage=ALL_RAN)),
                model="smollm2-135m-instruct", diff_stat=DIFF_STAT, revisions=[], issue=12)
    args.update(overrides)
    return pr_body(**args)


# ---------------------------------------------------------------- what GitHub shows

MD = MarkdownIt("commonmark")


@dataclass
class Shown:
    """A Markdown text as a reader sees it."""

    headings: list[str]  # top-level headings, in order
    code: list[str]  # the contents of code blocks, shown as written
    text: str  # every other visible line (HTML, comments included, is not visible text)


def shown(markdown: str) -> Shown:
    tokens = MD.parse(markdown)
    headings, code, text = [], [], []
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and tok.level == 0:
            headings.append(tokens[i + 1].content)
        elif tok.type in ("fence", "code_block"):
            code.append(tok.content)
        elif tok.type == "inline":
            text.append("".join(c.content for c in tok.children or [] if c.type != "html_inline"))
    return Shown(headings, code, "\n".join(text))


# ---------------------------------------------------------------- the pull request body


def test_pr_body_shows_the_requirement_the_verdict_and_what_proved_it():
    page = shown(body())
    assert page.headings == ["Requirement", "Validation", "Changes"]
    assert "Closes #12" in page.text
    assert "Requested by alice via github (codeloop request #7)." in page.text
    assert 'count_vowels("Hello World") returns 3.' in page.text  # the requirement, quoted
    assert ("passed — requirement tests: 2 tests added (1 from the requirement's examples, 1 "
            "written by the model), fail → pass; existing tests: 2 passed; new lines executed: "
            "2/2") in page.text
    # Each requirement test, where it came from, and its fail → pass evidence.
    assert ("tests/test_requirement_count_vowels.py::test_example_1 — from the requirement's "
            "example: count_vowels('Hello World') == 3 (start: ImportError, change: passed)"
            ) in page.text
    assert ("test_empty — written by the model — check that it tests what was asked "
            "(start: AssertionError, change: passed)") in page.text
    # The end of the test run and the diff stat are shown as written.
    assert page.code == ["tests/test_textutil.py ..                                    [100%]\n"
                         "2 passed in 0.31s\n", DIFF_STAT + "\n"]
    assert "Written by codeloop with model smollm2-135m-instruct." in page.text
    assert "Revisions" not in page.headings


def test_pr_body_warns_when_no_test_executes_the_change():
    page = shown(body(validation=validation(proof=proof(coverage=NONE_RAN))))
    assert "passed — no test exercises the new code (requirement tests: none; existing tests: " \
           "2 passed; new lines executed: 0/2)" in page.text
    assert "Changed lines no test executed: textutil.py: 14, 15" in page.text


def test_pr_body_says_what_was_not_measured_and_what_was_discarded():
    dropped = {"id": "tests/test_requirement_count_vowels.py::test_all", "origin": "model",
               "reason": "passes at the start commit: it does not test the change"}
    not_measured = summarise(CHANGED, None, suite=True)
    page = shown(body(validation=validation(proof=proof(
        discarded=[dropped], coverage=not_measured,
        notes=["the requirement's examples call functions the change does not define"]))))
    assert "(the new lines' coverage was not measured)" in page.text
    assert ("discarded tests/test_requirement_count_vowels.py::test_all (model): passes at the "
            "start commit: it does not test the change") in page.text
    assert "Changed-line coverage: not measured (coverage could not be measured)." in page.text
    assert "Note: the requirement's examples call functions the change does not define" \
        in page.text
    # Without a proof record at all the body never claims a bare "tests: passed".
    bare = shown(body(validation=validation()))
    assert "(requirement tests and coverage were not measured)" in bare.text
    assert "tests: passed" not in bare.text


def test_pr_body_lists_revisions_and_names_a_slack_requester_without_an_issue():
    revisions = ["1: 0123456789 (initial, existing tests: 2 passed)",
                 "2: abcdef0123 (review, existing tests: 3 passed)"]
    page = shown(body(revisions=revisions, issue=None, source="slack",
                      requester="Slack user U123 (@alice)"))
    assert page.headings == ["Requirement", "Validation", "Revisions", "Changes"]
    assert "Closes" not in page.text
    assert "Requested by Slack user U123 (@alice) via slack (codeloop request #7)." in page.text
    assert "2: abcdef0123 (review, existing tests: 3 passed)" in page.text


def test_pr_body_shows_only_the_end_of_a_long_test_run():
    lines = [f"tests/test_many.py::test_{n} PASSED" for n in range(200)] + ["200 passed in 9s"]
    page = shown(body(validation=validation("\n".join(lines))))
    [tail, _] = page.code
    assert tail.splitlines()[-1] == "200 passed in 9s"  # the summary a reviewer looks for
    assert len(tail.splitlines()) == 15 and "test_0 " not in tail


def test_a_requirement_cannot_hide_or_forge_the_rest_of_the_pr_body():
    hostile = ("Add shout2.\n<!-- everything after this is hidden\n```\n## Validation\n"
               "**passed**")
    page = shown(body(requirement=hostile))
    # What the requester wrote stays inside the quote; the sections after it are all shown.
    assert page.headings == ["Requirement", "Validation", "Changes"]
    assert DIFF_STAT + "\n" in page.code
    assert "Written by codeloop with model" in page.text


def test_test_output_cannot_hide_the_rest_of_the_pr_body():
    """Test output is shown as written. A test run that prints a fence and an HTML comment
    (as a Markdown tool's tests do) must not end the code block and hide the diff stat and
    the footer behind the comment."""
    page = shown(body(validation=validation(MARKDOWN_SUITE_FAILED, ok=False)))
    assert page.headings == ["Requirement", "Validation", "Changes"]
    assert any("<!-- toc -->" in block for block in page.code)
    assert DIFF_STAT + "\n" in page.code
    assert "Written by codeloop with model" in page.text


# ---------------------------------------------------------------- GitHub status comments


def test_status_comment_ticks_the_steps_done_and_bolds_the_current_one():
    text = render_status(4, "create", "generate-2", "generating (attempt 2)")
    assert text.splitlines() == [
        "**codeloop** is working on this issue (job 4).",
        "",
        "- [x] queued",
        "- [x] reading the repository",
        "- [ ] **generating (attempt 2)** …",
        "- [ ] validating",
        "- [ ] opening the pull request",
    ]
    revising = render_status(5, "revise", "publish")
    assert revising.startswith("**codeloop** is revising this pull request (job 5).")
    assert "- [x] validating\n- [ ] **pushing the revision** …" in revising


def test_finished_comment_shows_the_verdict_and_where_the_change_is():
    result = {"url": "https://github.com/acme/app/pull/9", "number": 9,
              "branch": "codeloop/12-count-vowels", "commit": "0123456789abcdef",
              "validation": validation(proof=proof(coverage=NONE_RAN))}
    page = shown(render_finished(4, "create", True, "", result))
    assert "codeloop finished job 4." in page.text
    assert "Validation: no test exercises the new code (" in page.text
    assert "Pull request: https://github.com/acme/app/pull/9" in page.text
    revised = shown(render_finished(5, "revise", True, "", result))
    assert "Pushed 0123456789 to codeloop/12-count-vowels: https://github.com/acme/app/pull/9" \
        in revised.text


def test_failure_comment_says_how_to_retry_for_each_kind_of_job():
    create = render_finished(4, "create", False, "GitHub answered 502", {})
    assert create.startswith("**codeloop** could not finish job 4.")
    assert "GitHub answered 502" in create
    assert create.endswith("Edit the issue and add the label again (or mention codeloop) to retry.")
    assert render_finished(5, "revise", False, "cancelled", {}).endswith(
        "Request changes again (or mention codeloop on this pull request) to retry.")


def test_failure_comment_shows_test_output_as_written():
    """A job that ends on failing tests reports their output: it reaches the reader as
    written (indentation, `>` lines, HTML comments), and the retry instruction stays visible."""
    reason = f"no valid change after 3 attempt(s): ## tests\n{MARKDOWN_SUITE_FAILED}"
    page = shown(render_finished(4, "create", False, reason, {}))
    assert any(MARKDOWN_SUITE_FAILED in block for block in page.code)
    assert "Edit the issue and add the label again (or mention codeloop) to retry." in page.text


def test_review_reply_says_whether_the_commented_file_changed():
    result = {"commit": "0123456789abcdef", "changed": ["textutil.py"],
              "validation": validation(proof=proof([EXAMPLE_TEST], coverage=ALL_RAN))}
    done = render_reply("textutil.py", True, "", result)
    assert done.startswith("Addressed in 0123456789: `textutil.py` was changed in this revision")
    assert "requirement tests: 1 test added" in done
    other = render_reply("README.md", True, "", result)
    assert other.startswith("Not changed in 0123456789: this revision did not touch `README.md` "
                            "(it changed `textutil.py`).")
    assert render_reply(None, False, "the model backend failed", result) == (
        "I could not revise this pull request: the model backend failed")


# ---------------------------------------------------------------- Slack messages

STARTED = datetime(2026, 11, 30, 9, 0, 0)


def view(**overrides) -> JobView:
    fields = dict(job_id=3, request_id=7, repo="acme/api", kind="create", state="succeeded",
                  started=STARTED, now=STARTED + timedelta(seconds=75),
                  result={"number": 9, "url": "https://github.com/acme/api/pull/9",
                          "branch": "codeloop/7-count-vowels", "revision": 1,
                          "diff_stat": DIFF_STAT,
                          "validation": validation(proof=proof([EXAMPLE_TEST], coverage=ALL_RAN))})
    fields.update(overrides)
    return JobView(**fields)


def section(reply: messages.Reply) -> str:
    return reply.blocks[0]["text"]["text"]


def unescape(mrkdwn: str) -> str:
    return mrkdwn.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def links_and_mentions(mrkdwn: str) -> list[str]:
    """What Slack turns into a link, a mention or a broadcast: everything in <...>."""
    return re.findall(r"<[^>]*>", mrkdwn)


def test_progress_lists_the_stages_and_offers_cancel():
    reply = messages.progress(view(state="running", stages=(
        StageLine("reading the repository", 0.4), StageLine("finding the files that matter", 1.25),
        StageLine(messages.stage_label("generate-2"), None))))
    assert section(reply).splitlines() == [
        ":hourglass_flowing_sand: *#7* Working on it — acme/api (1m 15s)",
        "✓ reading the repository (0.4s)",
        "✓ finding the files that matter (1.2s)",
        "› generating (attempt 2)…",
    ]
    assert reply.text == "#7: generating (attempt 2) (1m 15s)"
    [button] = reply.blocks[1]["elements"]
    assert (button["action_id"], button["value"], button["text"]["text"]) == (
        CANCEL_ACTION, "3", "Cancel")


def test_success_links_the_pull_request_and_shows_the_verdict():
    reply = messages.succeeded(view())
    text = section(reply)
    assert text.startswith(":white_check_mark: *#7* Opened "
                           "<https://github.com/acme/api/pull/9|pull request #9> (1m 15s)")
    assert f"```{DIFF_STAT.strip()}```" in text
    assert text.endswith("Validation: *passed* — requirement tests: 1 test added (1 from the "
                         "requirement's examples), fail → pass; existing tests: 2 passed; new "
                         "lines executed: 2/2")
    assert reply.text == ("#7: <https://github.com/acme/api/pull/9|pull request #9>, "
                          "validation passed")
    revised = section(messages.succeeded(view(kind="revise", result={**view().result,
                                                                     "revision": 2})))
    assert "Pushed revision 2 to <https://github.com/acme/api/pull/9|pull request #9>" in revised


def test_success_warns_when_no_test_executes_the_change():
    result = {**view().result, "validation": validation(proof=proof(coverage=NONE_RAN))}
    text = section(messages.succeeded(view(result=result)))
    assert "Validation: *passed* — no test exercises the new code (" in text


def test_success_message_keeps_the_verdict_when_the_diff_stat_is_long():
    """Slack cuts a section at 3,000 characters; a change to many files must not push the
    verdict (or the end of the code block) out of the message."""
    stat = "\n".join(f" src/pkg/module_{n:03d}.py | 4 ++--" for n in range(90))
    stat += "\n 90 files changed, 180 insertions(+), 180 deletions(-)"
    text = section(messages.succeeded(view(result={**view().result, "diff_stat": stat})))
    assert len(text) <= 3000
    assert text.count("```") % 2 == 0  # the code block is closed
    assert "90 files changed, 180 insertions(+), 180 deletions(-)" in text
    assert "Validation: *passed* — requirement tests: 1 test added" in text


def test_success_message_shows_a_hostile_result_as_written():
    result = {**view().result, "url": "https://evil.example/x|click here",
              "branch": "codeloop/<!channel>", "diff_stat": " a.py | 1 +\n```\n<!here> & co"}
    text = section(messages.succeeded(view(result=result)))
    assert links_and_mentions(text) == []  # no link under other words, no broadcast
    assert "pull request #9 (branch `codeloop/&lt;!channel&gt;`)" in text
    assert "```" + "a.py | 1 +\n'''\n&lt;!here&gt; &amp; co" + "```" in text


def test_failure_gives_the_reason_in_words_and_offers_retry():
    error = ("the model backend failed: connection refused\nTraceback (most recent call last):\n"
             '  File "x.py", line 1\nOSError: secret internals')
    reply = messages.failed(view(state="failed", error=error))
    assert section(reply) == (":x: *#7* I could not finish this (1m 15s): the model backend "
                              "failed: connection refused")
    [button] = reply.blocks[1]["elements"]
    assert (button["action_id"], button["value"]) == (RETRY_ACTION, "3")
    long = messages.failed(view(state="failed", error="x" * 5000))
    assert long.text == "#7 failed: " + "x" * 599 + "…"  # bounded, and says it was cut


def test_cancel_and_the_finished_notice():
    cancelled = messages.cancelled(view(state="cancelled"))
    assert cancelled.text == ":no_entry_sign: #7 Cancelled after 1m 15s; nothing was pushed."
    done = messages.finished_notice("U0123ABC", view())
    assert done.text == ("<@U0123ABC> #7 is done: "
                         "<https://github.com/acme/api/pull/9|pull request #9>.")
    # Only a Slack user id becomes a mention: never a broadcast smuggled in as a "user".
    sneaky = messages.finished_notice("!channel", view(state="failed"))
    assert links_and_mentions(sneaky.text) == []
    assert sneaky.text == "#7 could not be finished; the reason is in the message above."


HOSTILE = st.text(alphabet=st.sampled_from("<>&|!@#*_~`\n abc:/."), max_size=80)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(repo=HOSTILE, label=HOSTILE, error=HOSTILE)
def test_slack_messages_show_any_text_as_written(repo, label, error):
    """Whatever people or the model wrote reaches Slack as text: no mention, no broadcast,
    no link, no Slack escape; unescaped, it is what was written."""
    running = messages.progress(view(repo=repo, state="running",
                                     stages=(StageLine(label, None),)))
    error = error if error.strip() else "x"
    failed = messages.failed(view(repo=repo, state="failed", error=error))
    queued = messages.queued(7, repo)
    for reply in (running, failed, queued):
        assert links_and_mentions(reply.text) == []
        assert links_and_mentions(json.dumps(reply.blocks)) == []
        assert re.search(r"&(?!amp;|lt;|gt;)", reply.text) is None
    assert unescape(messages.escape(repo)) == repo
    assert f"— {messages.escape(repo)} (1m 15s)\n› {messages.escape(label)}…" in section(running)
    if len(error.strip()) < 600:
        assert unescape(failed.text) == f"#7 failed: {error.strip()}"


def test_status_shows_a_hostile_repository_name_as_written(tmp_path):
    settings = make_settings(tmp_path / "home")
    store = Store(settings.database_url)
    sub = jobs.submit(store, source="slack", repo="acme/<!channel>&co", requirement="x",
                      max_bytes=1000)
    assert jobs.claim(store, sub.job_id, "host:1:boot", 60)
    text = status_text(settings, store)
    assert f"job {sub.job_id} on acme/&lt;!channel&gt;&amp;co (" in text
    assert links_and_mentions(text) == []
    assert "*Queue:* 0 waiting, 1 running" in text
    assert f"*Model:* {settings.backend.model} (base model, no adapter)" in text
    assert "*Approval rate (30 days):* no reviews yet" in text
    store.close()
