"""Stage `publish`: the validated change committed, pushed, and the pull request opened (or
the revision pushed to it), with the description codeloop writes for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from bot import git, verdict, workspace
from bot.forges import RepoInfo
from bot.leases import failpoint
from bot.pipeline.base import JobFailed, Ports
from bot.pipeline.proof import add_requirement_tests
from bot.pipeline.results import Checkout, Chosen, JobInput, Published
from bot.settings import RepoConfig
from bot.store.models import PullRequest, Revision
from inference.edits import apply_edits, parse_edits


@dataclass(frozen=True)
class ToPublish:
    """Everything the publish stage needs: the job, where it was checked out, the answer."""

    job: JobInput
    info: RepoInfo
    ws: Checkout
    workdir: Path
    config: RepoConfig
    chosen: Chosen


def publish(ports: Ports, p: ToPublish) -> Published:
    store, forge = ports.store, ports.forge
    job, ws, workdir, good = p.job, p.ws, p.workdir, p.chosen
    validation = good.check.validation or {}
    workspace.reset(workdir, ws.start_sha)
    changed = apply_edits(parse_edits(good.text, good.format).edits, workdir, p.config)
    tests_added = add_requirement_tests(workdir, validation)
    changed += tests_added
    git.git(workdir, "add", "--", *changed)
    title = _title(job.requirement)
    # A deterministic commit (fixed dates from the job): a resumed publish makes the same
    # sha, so pushing again is a no-op rather than a second commit.
    stamp = job.created_at.strftime("%Y-%m-%dT%H:%M:%S+0000")
    message = (
        f"{title}\n\nRequested via {job.source} (codeloop request #{job.request_id}).\n\n"
        f"Codeloop-Job: {job.job_id}\nCodeloop-Model: {good.model}\n"
    )
    if job.kind == "revise":
        message = (f"Revise: address review feedback\n\nCodeloop-Job: {job.job_id}\n"
                   f"Codeloop-Model: {good.model}\n")
    dates = {"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
    git.git(workdir, "commit", "--quiet", "--no-verify", "-F", "-", input=message, env=dates)
    head = git.rev(workdir, "HEAD")
    expected = dict(good.check.blobs or git.blob_ids(workdir, changed))
    expected.update(git.blob_ids(workdir, tests_added))  # written just now from the proof
    try:
        git.verify_commit(workdir, ws.start_sha, head, expected)
    except git.GitError as exc:
        raise JobFailed(str(exc)) from exc
    diff_text = git.diff(workdir, ws.start_sha, head)
    stat = git.diff_stat(workdir, ws.start_sha, head)

    if job.kind == "create":
        with store.session() as s:
            pr = s.scalar(select(PullRequest).where(PullRequest.request_id == job.request_id))
            branch = pr.branch if pr else _new_branch(s, forge.name, p.info.repo, job)
    else:
        branch = ws.branch
    forge.push_branch(p.info, workdir, branch, head)
    failpoint(ports.settings.failpoint, "publish:pushed")

    with store.session() as s:
        if job.kind == "create":
            pr = s.scalar(select(PullRequest).where(PullRequest.request_id == job.request_id))
            if pr is None:
                pr = PullRequest(
                    request_id=job.request_id, forge=forge.name, repo=p.info.repo, branch=branch,
                    base_branch=ws.base_branch, title=title, body="", model_version=good.model,
                )
                s.add(pr)
                s.flush()
            trigger = "initial"
        else:
            pr = s.get(PullRequest, job.pull_request_id)
            trigger = "review"
        rev = s.scalar(select(Revision).where(Revision.job_id == job.job_id))
        if rev is None:
            rev = Revision(
                pull_request_id=pr.id, number=len(pr.revisions) + 1, job_id=job.job_id,
                commit_sha=head, diff=diff_text, diff_stat=stat,
                validation=validation, model_version=good.model, trigger=trigger,
            )
            s.add(rev)
            s.flush()
        pr_pk, number = pr.id, rev.number
    with store.session() as s:
        pr = s.get(PullRequest, pr_pk)
        total_stat = git.diff_stat(workdir, _merge_base(workdir, pr.base_branch, head), head)
        revs = [f"{r.number}: {r.commit_sha[:10]} ({r.trigger}, {verdict.line(r.validation)})"
                for r in pr.revisions]
        body = pr_body(
            requirement=job.requirement, requester=job.requester, source=job.source,
            request_id=job.request_id, validation=validation, model=good.model,
            diff_stat=total_stat, revisions=revs if len(revs) > 1 else [], issue=job.issue,
        )
        if job.kind == "create" and pr.number is None:
            opened = forge.open_pull_request(
                p.info, branch=branch, base=pr.base_branch, title=pr.title, body=body, pr_id=pr.id
            )
            pr.number, pr.url = opened.number, opened.url
            failpoint(ports.settings.failpoint, "publish:opened")  # the forge has it; we don't
        pr.body = body
        pr.model_version = good.model
        return Published(
            pull_request_id=pr.id, number=pr.number, url=pr.url, branch=branch, commit=head,
            revision=number, diff_stat=stat, validation=validation, changed=good.check.changed,
            attempt=good.attempt, model=good.model,
        )


def _output_tail(validation: dict, lines: int = 15) -> str:
    for check in reversed(validation.get("checks", [])):
        if check["name"] == "tests" and not check["skipped"]:
            return "\n".join(check["output"].rstrip().splitlines()[-lines:])
    return ""


def pr_body(
    *, requirement: str, requester: str | None, source: str, request_id: int,
    validation: dict, model: str, diff_stat: str, revisions: list[str], issue: int | None = None,
) -> str:
    """The pull request's description (decided here; the forge only sends it)."""
    lines = []
    if issue is not None:
        lines.append(f"Closes #{issue}\n")
    who = f" by {requester}" if requester else ""
    lines.append(f"Requested{who} via {source} (codeloop request #{request_id}).\n")
    lines.append("## Requirement\n")
    lines.extend("> " + line if line else ">" for line in requirement.strip().splitlines())
    lines.append("\n## Validation\n")
    lines.append(verdict.markdown(validation))
    tail = _output_tail(validation)
    if tail:
        lines.append("\n" + verdict.code_block(tail))
    if revisions:
        lines.append("\n## Revisions\n")
        lines.extend(f"- {r}" for r in revisions)
    lines.append(f"\n## Changes\n\n{verdict.code_block(diff_stat)}")
    lines.append(f"\n---\nWritten by codeloop with model `{model}`. Review it as any pull request: "
                 "request changes and codeloop revises this branch.")
    return "\n".join(lines)


def _new_branch(s: Session, forge: str, repo: str, job: JobInput) -> str:
    """`codeloop/<issue>-<slug>` (or `<request>` without an issue), unique per repository."""
    slug = git.slugify(job.requirement)
    branch = f"codeloop/{job.issue or job.request_id}-{slug}"
    taken = s.scalar(select(PullRequest.id).where(
        PullRequest.forge == forge, PullRequest.repo == repo, PullRequest.branch == branch))
    return branch if taken is None else f"{branch}-r{job.request_id}"


def _merge_base(workdir: Path, base_branch: str, head: str) -> str:
    base = git.rev(workdir, f"origin/{base_branch}") or head
    return git.git(workdir, "merge-base", base, head).strip() or base


def _title(requirement: str) -> str:
    first = requirement.strip().splitlines()[0].strip()
    return first if len(first) <= 72 else first[:69].rstrip() + "…"
