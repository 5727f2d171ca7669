"""What codeloop says in Slack, decided apart from sending it (docs/architecture.md).

Each function takes plain values and returns `Reply(text, blocks)`; the notifier and the
handler send them. `text` is the notification/fallback text, `blocks` the rich layout.

Everything that did not come from codeloop itself (what people wrote, repository names,
file names, failure reasons, model output) goes through `escape` before it is sent:
Slack reads `<...>` as mentions and links (`<!channel>` pings everyone, `<https://a|b>`
shows a link under other words) and `&` as the start of an escape, so Slack's docs ask
apps to send `&`, `<` and `>` as `&amp;`, `&lt;` and `&gt;`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from bot.pipeline.stages import stage_label as stage_label  # the notifier labels stages
from bot.slack.events import CANCEL_ACTION, RETRY_ACTION
from bot.verdict import line as verdict_line

FENCE = "`" * 3

@dataclass(frozen=True)
class Reply:
    text: str
    blocks: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class StageLine:
    label: str
    seconds: float | None  # None: running now


@dataclass(frozen=True)
class JobView:
    """A job as the progress message shows it (read from the store by the notifier)."""

    job_id: int
    request_id: int
    repo: str
    kind: str  # create | revise
    state: str
    started: datetime
    now: datetime
    stages: tuple[StageLine, ...] = ()
    result: dict = field(default_factory=dict)
    error: str | None = None


def elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m {seconds % 60:02d}s"


def escape(text: str) -> str:
    """Text shown as written: no mention, no link, no special command (Slack's escaping)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def repo_name(repo: str) -> str:
    return escape(repo)


_STATE_WORDS = {
    "queued": "is waiting in the queue", "running": "is running", "succeeded": "has finished",
    "failed": "failed", "cancelled": "was cancelled",
}


def state_words(state: str) -> str:
    """`job 4 has finished`, not `job 4 is succeeded`."""
    return _STATE_WORDS.get(state, f"is {state}")


def _section(text: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:2900]}}


def _button(action_id: str, label: str, job_id: int, style: str | None = None) -> dict:
    button = {"type": "button", "action_id": action_id, "value": str(job_id),
              "text": {"type": "plain_text", "text": label}}
    if style:
        button["style"] = style
    return button


def queued(request_id: int, repo: str, truncated_to: int | None = None) -> Reply:
    text = f"Queued as #{request_id} for {repo_name(repo)}"
    if truncated_to:
        text += f" (the requirement was over {truncated_to:,} bytes and was truncated)"
    return Reply(text)


def progress(view: JobView) -> Reply:
    took = elapsed((view.now - view.started).total_seconds())
    what = "Revising the pull request" if view.kind == "revise" else "Working on it"
    head = f":hourglass_flowing_sand: *#{view.request_id}* {what} — {repo_name(view.repo)} ({took})"
    lines = []
    for st in view.stages:
        if st.seconds is None:
            lines.append(f"› {escape(st.label)}…")
        else:
            lines.append(f"✓ {escape(st.label)} ({st.seconds:.1f}s)")
    body = head + ("\n" + "\n".join(lines) if lines else "")
    current = next((s.label for s in reversed(view.stages) if s.seconds is None), "queued")
    return Reply(
        text=f"#{view.request_id}: {escape(current)} ({took})",
        blocks=[_section(body), {"type": "actions", "block_id": "codeloop",
                                 "elements": [_button(CANCEL_ACTION, "Cancel", view.job_id,
                                                      "danger")]}],
    )


def _pr_link(result: dict) -> str:
    number, url = result.get("number"), str(result.get("url") or "")
    if url.startswith(("http://", "https://")) and not any(c in url for c in "<>|& \n"):
        return f"<{url}|pull request #{number}>"
    return f"pull request #{number} (branch `{escape(result.get('branch', ''))}`)"


def _diff_stat(diff_stat: str, limit: int = 1500) -> str:
    """The diff stat for a code block, escaped and bounded: the file lines that do not fit are
    counted, the summary line (files changed, insertions, deletions) is always kept."""
    lines = escape(diff_stat.strip().replace(FENCE, "'" * 3)).splitlines()
    if sum(len(line) + 1 for line in lines) <= limit:
        return "\n".join(lines)
    *files, summary = lines
    kept: list[str] = []
    size = len(summary) + 40  # the summary and the "… N more files" line
    for line in files:
        size += len(line) + 1
        if size > limit:
            break
        kept.append(line)
    return "\n".join([*kept, f"… {len(files) - len(kept)} more files", summary])


def succeeded(view: JobView) -> Reply:
    r = view.result
    took = elapsed((view.now - view.started).total_seconds())
    validation = r.get("validation") or {}
    verdict = "passed" if validation.get("ok") else "failed"
    if view.kind == "revise":
        head = (f":white_check_mark: *#{view.request_id}* Pushed revision {r.get('revision')} to "
                f"{_pr_link(r)} ({took})")
    else:
        head = f":white_check_mark: *#{view.request_id}* Opened {_pr_link(r)} ({took})"
    stat = _diff_stat(r.get("diff_stat") or "")
    body = head + (f"\n{FENCE}{stat}{FENCE}" if stat else "") + \
        f"\nValidation: *{verdict}* — {escape(verdict_line(validation))}"
    text = f"#{view.request_id}: {_pr_link(r)}, validation {verdict}"
    return Reply(text=text, blocks=[_section(body)])


def failed(view: JobView) -> Reply:
    took = elapsed((view.now - view.started).total_seconds())
    reason = plain_reason(view.error or "the job failed")
    body = f":x: *#{view.request_id}* I could not finish this ({took}): {reason}"
    return Reply(
        text=f"#{view.request_id} failed: {reason}",
        blocks=[_section(body), {"type": "actions", "block_id": "codeloop",
                                 "elements": [_button(RETRY_ACTION, "Retry", view.job_id,
                                                      "primary")]}],
    )


def cancelled(view: JobView) -> Reply:
    took = elapsed((view.now - view.started).total_seconds())
    text = f":no_entry_sign: *#{view.request_id}* Cancelled after {took}; nothing was pushed."
    return Reply(text=text.replace("*", ""), blocks=[_section(text)])


def plain_reason(error: str, limit: int = 600) -> str:
    """A failure in words: the first lines, no tracebacks, bounded, escaped for Slack."""
    text = error.strip()
    if "Traceback (most recent call last)" in text:
        text = text.split("Traceback (most recent call last)")[0].strip() or "an internal error"
    text = text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
    return escape(text)


def finished_notice(user: str | None, view: JobView) -> Reply:
    """A new message that @mentions the requester when the work ends: an edit of the
    progress message notifies nobody; a new message with their mention does."""
    who = f"<@{user}> " if user and user.isalnum() else ""
    if view.state == "succeeded":
        what = f"#{view.request_id} is done: {_pr_link(view.result)}."
    elif view.state == "cancelled":
        what = f"#{view.request_id} was cancelled; nothing was pushed."
    else:
        what = f"#{view.request_id} could not be finished; the reason is in the message above."
    return Reply(who + what)


def revising(pr_number: int | None, job_id: int) -> Reply:
    return Reply(f"Revising pull request #{pr_number} with your follow-up (job {job_id}): "
                 "one new commit on the same branch.")


def not_linked() -> Reply:
    return Reply(
        "This channel is not linked to a repository, so I don't know where the change goes. "
        "Mention me with `repo=owner/name` (for example `@codeloop add a --verbose flag "
        "repo=acme/api`), or ask a codeloop admin to run `/codeloop link owner/name` here."
    )


HELP = (
    "*codeloop* turns requirements into pull requests.\n"
    "• Write a message in a channel linked to a repository, mention me "
    "(`@codeloop <requirement> repo=owner/name`), or run `/codeloop <requirement>`.\n"
    "• Reply in the thread to revise the same pull request.\n"
    "Admins: `/codeloop link owner/name`, `/codeloop unlink`, `/codeloop status`, "
    "`/codeloop retrain now`, `/codeloop schedule <cron>` / `/codeloop schedule off`."
)
