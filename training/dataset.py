"""Dataset builder: the store's merged changes and review signals → training examples.

config → data: `build_dataset(settings, store, repo, ...)` reads one repository's history
from the store and returns a `TrainingData` with

- `sft`: every merged change (the bot's and people's): prompt = the linked issue (or the
  pull request's title and body, or the bot's requirement) plus the repository context the
  pipeline would retrieve at the change's base; completion = the change in the model's edit
  format. Review comment → revision pairs of merged bot pull requests are SFT too.
- `preference`: bot pull requests revised after review and merged: the first revision is
  `rejected`, the final merged change is `chosen`.
- `kto`: bot revisions labelled by how they were received (approved / merged unchanged →
  desirable; changes requested / closed unmerged → undesirable). Closed code only ever
  appears here, never in SFT.
- execution-verified (when the store has the pipeline's `candidates`): answers to one prompt
  that passed and failed validation become a preference pair and KTO labels, counted
  separately in the card (`preference_by_source`, `kto_by_source`).

Hygiene: examples with secrets are dropped (detect-secrets, offline regex plugins only, plus
codeloop's own configured secrets); vendored, generated, lock and binary files are removed
from changes (a change with nothing left is dropped); exact and near duplicates (MinHash,
datasketch) are dropped; training examples that overlap the evaluation sets (the held-out
changes and the HumanEval guard) are dropped. The newest `holdout_share` of merged changes
is held out by time. `card` counts examples by source, by reason dropped and by split.

Every forge: the repository is read from where its forge keeps it (`source`, a forge from the
composition root: for GitHub the local mirror, fetched up to date before the build; for the
local forge the repository itself). Only changes merged into the default branch (or a branch
listed in `training_branches` / `base_branch` of the default branch's `.codeloop.yml`) are
training material. A merged change whose branch the forge has not confirmed yet is confirmed
once (`source.pull_facts`: GitHub's `merged`, `merged_at` and base branch) and stored, so
`merged_at` is the forge's, not the time codeloop processed the event. A pull request's
outcome comes from the whole history: a merge is final, so a pull request closed, reopened
and merged counts as merged whatever order its signals were stored in.

The parts: training/sources.py (where the history is read from), training/render.py (prompts
and answers in the edit format), training/hygiene.py (what never becomes training data).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import select

from bot.settings import Settings
from bot.store.db import Store
from bot.store.models import Job, MergedChange, PullRequest, Request, ReviewSignal
from inference.edits import default_format_for
from training.examples import Example, TrainingData
from training.hygiene import decontaminate, dedupe, has_secret, humaneval_texts
from training.render import (
    BuildContext,
    change_signature,
    completion_at,
    prompt_at,
    requirement_for,
)
from training.sources import (
    Checkout,
    HistorySource,
    Located,
    confirm_with_forge,
    is_ancestor,
    locate,
    repo_config_at,
    training_branches,
)

log = logging.getLogger(__name__)

CountTokens = Callable[[str], int]




# ================================================================ diffs and files


# ================================================================ completions in the edit format


# ================================================================ hygiene


# ================================================================ the builder


def count_new_examples(store: Store, repo: str, since: datetime | None) -> int:
    """Merged changes of `repo` newer than `since` (all of them when None)."""
    from sqlalchemy import func

    with store.session() as s:
        q = select(func.count()).select_from(MergedChange).where(MergedChange.repo == repo)
        if since is not None:
            q = q.where(MergedChange.merged_at > since)
        return int(s.scalar(q) or 0)


def build_dataset(
    settings: Settings,
    store: Store,
    repo: str,
    *,
    count_tokens: CountTokens | None = None,
    edit_format: str | None = None,
    repo_dirs: dict[str, Path] | None = None,
    humaneval_limit: int | None = None,
    work_dir: Path | None = None,
    source: HistorySource | None = None,
    located: Located | None = None,
) -> TrainingData:
    """Every example of one repository, cleaned and split; see the module docstring.

    `source` is the repository's forge (from the composition root); `located` a place already
    resolved with `locate` (the forge is then not asked again for the repository)."""
    cfg = settings.training
    count_tokens = count_tokens or (lambda text: max(1, len(text) // 4))
    where = located or locate(repo, settings, repo_dirs, source)
    repo_dir = where.dir
    rc = repo_config_at(repo_dir, where.default_branch)
    fmt = edit_format or rc.edit_format or default_format_for(rc.model or settings.backend.model)
    confirmed = confirm_with_forge(store, repo, source)
    checkout = Checkout(repo_dir) if repo_dir is not None else None
    tmp_index = Path(tempfile.mkdtemp(prefix="codeloop-dsindex-", dir=work_dir))
    c = BuildContext(settings, fmt, count_tokens, checkout, tmp_index, Counter(), Counter(),
                 repo_dir=repo_dir, branches=training_branches(where.default_branch, rc),
                 source=source)
    built: Counter = Counter()
    secrets = settings.secret_values()
    try:
        merged, review_sft, pref, kto = _collect(c, store, repo, built)
        cand_pref, cand_kto = _candidate_examples(c, store, repo, built)
        pref, kto = pref + cand_pref, kto + cand_kto
    finally:
        if checkout is not None:
            checkout.close()
        shutil.rmtree(tmp_index, ignore_errors=True)

    def clean(examples: list[Example]) -> list[Example]:
        out = []
        for ex in examples:
            text = json.dumps(ex.prompt) + ex.completion + ex.chosen + ex.rejected
            if has_secret(text, secrets):
                c.drops["secret"] += 1
                continue
            longest = max(count_tokens(ex.completion or ""), count_tokens(ex.chosen or ""),
                          count_tokens(ex.rejected or ""))
            prompt_tokens = sum(count_tokens(m["content"]) + 8 for m in ex.prompt)
            if prompt_tokens + longest > cfg.max_seq_len:
                c.drops["too_long"] += 1
                continue
            out.append(ex)
        return out

    merged, review_sft, pref, kto = clean(merged), clean(review_sft), clean(pref), clean(kto)

    # Time split: the newest share of merged changes is the evaluation set.
    merged.sort(key=lambda e: (e.when or datetime.min, e.key))
    n_hold = 0
    if cfg.holdout_share > 0 and len(merged) >= 2:
        n_hold = max(1, math.ceil(len(merged) * cfg.holdout_share))
    heldout = merged[len(merged) - n_hold :] if n_hold else []
    train = merged[: len(merged) - n_hold]
    cutoff = heldout[0].when if heldout else None
    # Revisions and signals from the held-out period stay out of training too.
    if cutoff is not None:
        review_sft = [e for e in review_sft if e.when is None or e.when < cutoff]
        pref = [e for e in pref if e.when is None or e.when < cutoff]
        kto = [e for e in kto if e.when is None or e.when < cutoff]

    sft = dedupe(train + review_sft, cfg.near_duplicate_threshold, c.drops)
    pref = dedupe(pref, cfg.near_duplicate_threshold, c.drops)
    kto = dedupe(kto, cfg.near_duplicate_threshold, c.drops)
    eval_texts = [e.change_text() for e in heldout]
    if cfg.humaneval_subset or humaneval_limit:
        eval_texts += humaneval_texts(humaneval_limit or cfg.humaneval_subset)
    sft = decontaminate(sft, eval_texts, cfg.near_duplicate_threshold, c.drops)
    pref = decontaminate(pref, eval_texts, cfg.near_duplicate_threshold, c.drops)
    kto = decontaminate(kto, eval_texts, cfg.near_duplicate_threshold, c.drops)

    all_when = [e.when for e in merged if e.when]
    card = {
        "repo": repo,
        "edit_format": fmt,
        "training_branches": c.branches,
        "confirmed_by_forge": confirmed,
        "built_by_source": dict(built),
        "dropped_by_reason": dict(c.drops),
        "files_dropped_by_reason": dict(c.file_drops),
        "kept": {
            "sft": len(sft), "heldout": len(heldout), "preference": len(pref), "kto": len(kto),
            "kto_desirable": sum(1 for e in kto if e.label),
            "kto_undesirable": sum(1 for e in kto if e.label is False),
        },
        "sft_by_source": dict(Counter(e.source for e in sft)),
        "preference_by_source": dict(Counter(e.source for e in pref)),
        "kto_by_source": dict(Counter(e.source for e in kto)),
        "holdout_share": cfg.holdout_share,
        "heldout_from": cutoff.isoformat() if cutoff else None,
        "data_from": min(all_when).isoformat() if all_when else None,
        "data_until": max(all_when).isoformat() if all_when else None,
        "max_seq_len": cfg.max_seq_len,
        "built_at": datetime.utcnow().isoformat(timespec="seconds"),
    }
    return TrainingData(repo=repo, edit_format=fmt, sft=sft, heldout=heldout, preference=pref,
                        kto=kto, card=card, data_until=max(all_when) if all_when else None)


def _collect(c: BuildContext, store: Store, repo: str, built: Counter):
    merged: list[Example] = []
    review_sft: list[Example] = []
    pref: list[Example] = []
    kto: list[Example] = []
    with store.session() as s:
        changes = s.scalars(
            select(MergedChange).where(MergedChange.repo == repo).order_by(MergedChange.merged_at)
        ).all()
        prs = s.scalars(select(PullRequest).where(PullRequest.repo == repo)).all()
        pr_rows = {}
        for pr in prs:
            req = s.get(Request, pr.request_id)
            revs = []
            for rev in pr.revisions:
                job = s.get(Job, rev.job_id)
                revs.append({"id": rev.id, "number": rev.number, "sha": rev.commit_sha,
                             "diff": rev.diff, "trigger": rev.trigger, "when": rev.created_at,
                             "feedback": job.feedback if job else None})
            sigs = [{"id": g.id, "kind": g.kind, "revision_id": g.revision_id,
                     "when": g.created_at}
                    for g in s.scalars(select(ReviewSignal).where(
                        ReviewSignal.pull_request_id == pr.id))]
            pr_rows[pr.id] = {"state": pr.state, "number": pr.number, "forge": pr.forge,
                              "requirement": req.requirement if req else pr.title,
                              "revisions": revs, "signals": sigs}
        change_rows = [
            {"id": m.id, "title": m.title, "body": m.body, "issue_title": m.issue_title,
             "issue_body": m.issue_body, "diff": m.diff, "base": m.base_sha, "merge": m.merge_sha,
             "pr": m.pull_request_id, "when": m.merged_at, "external_id": m.external_id,
             "base_ref": m.base_ref, "obj": m}
            for m in changes
        ]
    merged_prs = {row["pr"] for row in change_rows if row["pr"] and row["base_ref"] != ""}
    for pr_id, pr in pr_rows.items():
        pr["state"] = outcome(pr["state"], pr["signals"], pr_id in merged_prs)
        if pr["state"] == "closed" and _forge_says_merged(c, repo, pr):
            pr["state"] = "merged"

    merged_by_pr = {}
    for row in change_rows:
        built["merged_change"] += 1
        reason = _not_training_material(c, row)
        if reason:
            c.drops[reason] += 1
            continue
        if row["base"] and c.checkout is not None and not c.checkout.has(row["base"]) \
                and row["merge"] and c.checkout.has(row["merge"]):
            row["base"] = c.checkout.rev(f"{row['merge']}^1") or row["base"]
        pr = pr_rows.get(row["pr"]) if row["pr"] else None
        requirement = requirement_for(row["obj"], pr["requirement"] if pr else None)
        key = f"merged:{row['external_id']}"
        answer, paths, reason = completion_at(c, row["base"], row["diff"], row["merge"], key)
        if reason:
            c.drops[reason] += 1
            continue
        prompt = prompt_at(c, row["base"], requirement, None, c.count_tokens(answer), key)
        ex = Example(key=key, kind="sft", source="merged_change", prompt=prompt,
                     completion=answer, when=row["when"], paths=paths,
                     meta={"merged_change_id": row["id"], "base_sha": row["base"],
                           "merge_sha": row["merge"], "requirement": requirement,
                           "pull_request_id": row["pr"], "diff": row["diff"],
                           "change": change_signature(row["diff"], requirement)})
        merged.append(ex)
        if row["pr"]:
            merged_by_pr[row["pr"]] = (ex, row)

    for pr_id, pr in pr_rows.items():
        revs = pr["revisions"]
        if not revs:
            continue
        base_of_first = None
        if pr_id in merged_by_pr:
            base_of_first = merged_by_pr[pr_id][1]["base"]
        # Review comment → revision (merged pull requests only: closed code never enters SFT).
        if pr["state"] == "merged":
            for prev, rev in zip(revs, revs[1:], strict=False):
                if rev["trigger"] != "review" or not rev["feedback"]:
                    continue
                built["review_revision"] += 1
                key = f"revision:{rev['id']}"
                answer, paths, reason = completion_at(c, prev["sha"], rev["diff"], rev["sha"], key)
                if reason:
                    c.drops[reason] += 1
                    continue
                prompt = prompt_at(c, prev["sha"], pr["requirement"], rev["feedback"],
                                    c.count_tokens(answer), key)
                review_sft.append(Example(key=key, kind="sft", source="review_revision",
                                          prompt=prompt, completion=answer, when=rev["when"],
                                          paths=paths, meta={"revision_id": rev["id"],
                                          "change": change_signature(rev["diff"],
                                                                     rev["feedback"])}))
        # Preference: first bot diff (rejected) vs the final merged change (chosen).
        if pr["state"] == "merged" and len(revs) > 1 and pr_id in merged_by_pr:
            built["preference"] += 1
            chosen_ex, row = merged_by_pr[pr_id]
            rejected, _, reason = completion_at(c, base_of_first, revs[0]["diff"], revs[0]["sha"],
                                              f"pref:{pr_id}")
            if reason or rejected == chosen_ex.completion:
                c.drops[reason or "same_answer"] += 1
            else:
                pref.append(Example(key=f"pref:{pr_id}", kind="preference", source="preference",
                                    prompt=chosen_ex.prompt, chosen=chosen_ex.completion,
                                    rejected=rejected, when=row["when"], paths=chosen_ex.paths,
                                    meta={"pull_request_id": pr_id, "change": change_signature(
                                        row["diff"] + revs[0]["diff"], pr["requirement"])}))
        # KTO labels on each revision that was judged.
        final = revs[-1]
        for rev in revs:
            kinds = {g["kind"] for g in pr["signals"] if g["revision_id"] == rev["id"]}
            label = None
            if "changes_requested" in kinds or (rev is final and pr["state"] == "closed"):
                label = False
            elif "approved" in kinds or (
                    rev is final and pr["state"] == "merged" and len(revs) == 1):
                label = True
            if label is None:
                continue
            built["kto"] += 1
            prev_sha = base_of_first if rev["number"] == 1 else next(
                (r["sha"] for r in revs if r["number"] == rev["number"] - 1), None)
            key = f"kto:{rev['id']}"
            answer, paths, reason = completion_at(c, prev_sha, rev["diff"], rev["sha"], key)
            if reason:
                c.drops[reason] += 1
                continue
            prompt = prompt_at(c, prev_sha, pr["requirement"],
                                rev["feedback"] if rev["trigger"] == "review" else None,
                                c.count_tokens(answer), key)
            kto.append(Example(key=key, kind="kto", source="kto", prompt=prompt, completion=answer,
                               label=label, when=rev["when"], paths=paths,
                               meta={"revision_id": rev["id"], "label": label,
                                     "change": change_signature(rev["diff"], pr["requirement"])}))
    return merged, review_sft, pref, kto


STATE_KINDS = {"merged": "merged", "closed_unmerged": "closed", "reopened": "open"}


def outcome(stored: str, signals: list[dict], has_merged_change: bool) -> str:
    """How a pull request ended, from its whole history: a merge is final (a merged pull
    request cannot be reopened), so any record of one wins; otherwise the latest state
    signal (closed / reopened) wins over the stored state."""
    if has_merged_change or stored == "merged":
        return "merged"
    if any(g["kind"] == "merged" for g in signals):
        return "merged"
    states = sorted((g for g in signals if g["kind"] in STATE_KINDS),
                    key=lambda g: (g["when"] or datetime.min, g.get("id") or 0))
    if states:
        return STATE_KINDS[states[-1]["kind"]]
    return stored


def _forge_says_merged(c: BuildContext, repo: str, pr: dict) -> bool | None:
    """For a pull request stored as closed: the forge's own answer (GitHub: merged or not)."""
    facts_of = getattr(c.source, "pull_facts", None)
    if pr["state"] != "closed" or facts_of is None or pr["number"] is None \
            or pr["forge"] != getattr(c.source, "name", None):
        return None
    try:
        facts = facts_of(repo, int(pr["number"]))
    except Exception as exc:  # noqa: BLE001 - the stored state stands
        log.warning("dataset for %s: state of #%s not read: %s", repo, pr["number"], exc)
        return None
    return bool(facts and facts.get("merged"))


def _not_training_material(c: BuildContext, row: dict) -> str | None:
    """Why a merged change is not training material (not merged into a training branch)."""
    if row["base_ref"] == "":
        return "not_merged"
    if row["base_ref"]:
        return None if row["base_ref"] in c.branches else "not_training_branch"
    if c.repo_dir is not None and row["merge"] and c.branches:
        on = is_ancestor(c.repo_dir, row["merge"], c.branches)
        if on is False:
            return "not_training_branch"
    return None


def _candidate_examples(c: BuildContext, store: Store, repo: str,
                        built: Counter) -> tuple[list[Example], list[Example]]:
    """Execution-verified preferences from the pipeline's stored candidates (best of N), when
    the store has them (table `candidates`: one row per generated answer of one prompt, with
    `ok` = passed validation). For each prompt with a passing and a failing answer: a
    preference pair (the kept passing answer chosen, a failing one rejected) and each answer
    as a KTO example labelled by whether it passed. Prompts where nothing passed are left
    out: there the failure may be the environment's, not the answer's."""
    from sqlalchemy import MetaData, Table, inspect

    if not inspect(store.engine).has_table("candidates"):
        return [], []
    table = Table("candidates", MetaData(), autoload_with=store.engine)
    jobs = select(Job.id).join(Request, Request.id == Job.request_id).where(
        Request.repo == repo)
    with store.session() as s:
        rows = s.execute(select(table).where(table.c.job_id.in_(jobs))
                         .order_by(table.c.job_id, table.c.attempt, table.c.idx)).mappings().all()
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["job_id"], row["attempt"]), []).append(row)
    pref: list[Example] = []
    kto: list[Example] = []
    for (job_id, attempt), group in groups.items():
        passed = sorted((r for r in group if r["ok"]), key=lambda r: not r.get("chosen"))
        failed = [r for r in group if not r["ok"]]
        if not passed or not failed:
            continue
        prompt = (group[0]["prompt"] or {}).get("messages") or []
        if not prompt:
            continue
        when = max(r["created_at"] for r in group)
        built["candidate_preference"] += 1
        good, bad = passed[0]["text"], failed[0]["text"]
        pref.append(Example(
            key=f"candidate-pref:{job_id}:{attempt}", kind="preference",
            source="candidate_preference", prompt=prompt, chosen=good, rejected=bad, when=when,
            meta={"job_id": job_id, "attempt": attempt, "change": good + "\n" + bad}))
        for r in group:
            built["candidate_kto"] += 1
            kto.append(Example(
                key=f"candidate-kto:{r['id']}", kind="kto", source="candidate_kto",
                prompt=prompt, completion=r["text"], label=bool(r["ok"]), when=r["created_at"],
                meta={"candidate_id": r["id"], "label": bool(r["ok"]), "change": r["text"]}))
    return pref, kto


