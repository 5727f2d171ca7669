"""The learning loop for a GitHub-hosted repository: the dataset comes from the GitHub
forge's mirror (fetched before the build), with GitHub's merged_at, only merges into the
default branch (or configured branches), and the outcome of a pull request closed, reopened
and merged is `merged`. On SQLite and PostgreSQL.

Model-free; tests/test_learning_model.py trains on this history (the "done when" test).
"""

from __future__ import annotations

import subprocess

from sqlalchemy import select

from bot.settings import TrainingSettings
from bot.store.models import MergedChange, PullRequest
from tests.github_history import NAMES, git, make_github_history
from training.dataset import build_dataset


def test_a_github_repository_dataset_comes_from_the_mirror_with_githubs_facts(tmp_path, db_url):
    h = make_github_history(tmp_path, db_url)
    env, store = h.env, h.env.runtime.store
    env.settings.training = TrainingSettings(max_seq_len=2048, holdout_share=0.3,
                                             humaneval_subset=0, min_new_examples=1)
    forge = env.runtime.ports.forge
    mirror = forge.mirror_path(env.repo.full_name)
    merge_c = env.repo.pulls[h.c]["merge_commit_sha"]
    # The person's merges came after codeloop last fetched: the mirror does not have them yet.
    stale = subprocess.run(["git", "cat-file", "-e", merge_c], cwd=mirror, capture_output=True)
    assert stale.returncode != 0

    data = build_dataset(env.settings, store, env.repo.full_name, source=forge)
    card = data.card
    examples = {e.key: e for e in data.sft + data.heldout}
    # A, B (codeloop's) and C (a person's) are training material; D went into `release`.
    assert {f"merged:{n}" for n in (h.a, h.b, h.c)} <= set(examples), card
    assert f"merged:{h.d}" not in examples
    assert card["dropped_by_reason"].get("not_training_branch") == 1, card
    assert card["training_branches"] == ["main"]
    # The webhook stored each merge's branch and time: nothing had to be asked of GitHub.
    assert card["confirmed_by_forge"] == {}
    # The mirror was brought up to date before the build: C's whole-file answer is read there.
    ex_c = examples[f"merged:{h.c}"]
    assert ex_c.completion.startswith("names.py\n```python\n") and "def initials" in ex_c.completion
    assert "Need initials(name)" in ex_c.prompt[-1]["content"]  # the linked issue
    assert NAMES not in ex_c.prompt[-1]["content"]  # context from before the merge
    # merged_at is GitHub's, not the time the delivery was processed; the newest is held out.
    for n in (h.a, h.b, h.c):
        assert examples[f"merged:{n}"].when == h.merged_at[n]
    assert [e.key for e in data.heldout] == [f"merged:{h.c}"]
    with store.session() as s:
        rows = {int(m.external_id): m for m in s.scalars(select(MergedChange))}
        assert {n: rows[n].merged_at for n in rows} == h.merged_at
        assert rows[h.d].base_ref == "release" and rows[h.a].base_ref == "main"
        # B was closed, reopened, merged: whatever state the store kept, it counts as merged.
        pr_b = s.scalar(select(PullRequest).where(PullRequest.number == h.b))
        pr_b_id = pr_b.id
    kto_b = [e for e in data.kto if e.meta.get("revision_id") in _revision_ids(store, pr_b_id)]
    assert kto_b and all(e.label is True for e in kto_b), [e.label for e in kto_b]
    # A: the first revision (changes requested) is undesirable, the approved one desirable;
    # the review → revision pair and the preference pair come from it too.
    assert sorted(e.label for e in data.kto) == [False, True, True]
    assert [e.source for e in data.sft if e.source == "review_revision"] == ["review_revision"]
    assert len(data.preference) == 1

    # Asked again: nothing more to confirm (GitHub is not asked twice for the same merge).
    calls = len(env.fake.log)
    build_dataset(env.settings, store, env.repo.full_name, source=forge)
    pulls_asked = [p for m, p, _ in env.fake.log[calls:] if "/pulls/" in p and m == "GET"]
    assert pulls_asked == [], pulls_asked

    # The default branch's .codeloop.yml can make `release` a training branch too.
    git(h.work, "checkout", "-q", "-B", "cfg", "origin/main")
    (h.work / ".codeloop.yml").write_text(
        "test_command: python -m pytest -q\ntraining_branches: [release]\n")
    git(h.work, "commit", "-qam", "Train on release too")
    git(h.work, "push", "-q", "origin", "cfg:main")
    data = build_dataset(env.settings, store, env.repo.full_name, source=forge)
    assert data.card["training_branches"] == ["main", "release"]
    keys = {e.key for e in data.sft + data.heldout}
    assert f"merged:{h.d}" in keys and "not_training_branch" not in data.card["dropped_by_reason"]
    env.close()


def _revision_ids(store, pr_id: int) -> set[int]:
    from bot.store.models import Revision

    with store.session() as s:
        return set(s.scalars(select(Revision.id).where(Revision.pull_request_id == pr_id)))
