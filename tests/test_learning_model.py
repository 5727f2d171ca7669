"""The learning loop on the real embedded model: train a few steps on the stored history,
load the adapter with PEFT and in the vLLM server (vLLM test tier), gate candidates.

One small training run (a few steps, short sequences) serves the whole module.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from bot.ports import GenerationParams, Message
from bot.settings import BackendSettings, TrainingSettings
from bot.store.db import Store
from tests.support import make_settings
from tests.learning_history import make_history
from tests.test_vllm import backend_for
from training import registry
from training.dataset import build_dataset
from training.evaluate import decide, load_models, measure
from training.train import TARGET_MODULES, check_adapter, train

pytestmark = [pytest.mark.model, pytest.mark.xdist_group("vllm")]

ASK = [Message("user", "Write a Python function last_word(text).")]


def lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="session")  # session: xdist may interleave modules on a worker
def trained(tmp_path_factory, embedded_model_dir):
    root = tmp_path_factory.mktemp("learning")
    training = TrainingSettings(max_seq_len=512, holdout_share=0.3, grad_accum=1,
                                learning_rate=1e-3, lora_rank=8, lora_alpha=16,
                                humaneval_subset=1, eval_max_new_tokens=12, min_new_examples=1)
    settings = make_settings(root / "home", training=training)
    store = Store(settings.database_url)
    repo = make_history(root, store)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    data = build_dataset(settings, store, str(repo),
                         count_tokens=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    assert len(data.sft) >= 3 and data.heldout, data.card
    result = train(settings, data, embedded_model_dir, root / "run", max_steps=3)
    return {"settings": settings, "store": store, "repo": repo, "data": data, "result": result,
            "root": root}


def test_training_changes_the_adapter_and_it_loads_with_peft(trained, embedded_model_dir):
    result = trained["result"]
    adapter = result.adapter_dir
    # An adapter vLLM can serve: the seven projections, rank 8, nothing else saved.
    config = check_adapter(adapter)
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES) and config["r"] == 8
    assert not config.get("modules_to_save")
    # PEFT initialises lora_B to zero: training moved it.
    tensors = lora_tensors(adapter)
    b = [t for name, t in tensors.items() if "lora_B" in name]
    assert len(b) == 7 * 30  # seven projections in each of the 30 layers
    assert sum(float(t.abs().sum()) for t in b) > 0
    # Loss per step, the curve, the card with the run.
    assert [p["step"] for p in result.losses] == [1, 2, 3]
    assert result.losses[-1]["loss"] < result.losses[0]["loss"]
    chart = (adapter.parent / "loss.svg").read_text()  # the dashboard's chart, one point a step
    [points] = re.findall(r'<polyline class="loss"[^>]* points="([^"]+)"', chart)
    assert len(points.split()) == 3
    assert (adapter.parent / "dataset" / "dataset_card.json").exists()
    assert result.tokens > 0 and result.padding_share == 0.0

    from inference.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(embedded_model_dir, model_name="smollm2-135m-instruct")
    base = backend.generate(ASK, GenerationParams(max_tokens=16, model="smollm2-135m-instruct"))
    backend.load_adapter("textrepo-v1", adapter)
    tuned = backend.generate(ASK, GenerationParams(max_tokens=16, model="textrepo-v1"))
    assert tuned.model == "textrepo-v1" and tuned.completion_tokens > 0
    again = backend.generate(ASK, GenerationParams(max_tokens=16, model="smollm2-135m-instruct"))
    assert again.text == base.text  # the base model is still there, by its name
    print(f"\nbase: {base.text!r}\ntuned: {tuned.text!r}")


def test_gate_rejects_a_damaged_adapter_and_promotes_a_sound_one(trained, embedded_model_dir):
    import torch
    from safetensors.torch import save_file

    settings, store, data = trained["settings"], trained["store"], trained["data"]
    sound = trained["result"].adapter_dir
    damaged = trained["root"] / "damaged"
    shutil.copytree(sound, damaged)
    torch.manual_seed(1)
    tensors = {k: (v + torch.randn_like(v) * 0.5 if "lora_B" in k else v)
               for k, v in lora_tensors(sound).items()}
    save_file(tensors, str(damaged / "adapter_model.safetensors"))

    loaded = load_models(embedded_model_dir, {"sound": sound, "damaged": damaged})
    kw = dict(edit_format=data.edit_format, repo_dir=trained["repo"])
    base = measure(settings, loaded, None, data.heldout, **kw)
    assert len(base["loss"]) == len(data.heldout) and len(base["humaneval"]) == 1
    bad = decide(measure(settings, loaded, "damaged", data.heldout, **kw), base, settings)
    good = decide(measure(settings, loaded, "sound", data.heldout, **kw), base, settings)
    print(f"\ndamaged: {bad['metrics']['loss']}\nsound: {good['metrics']['loss']}")
    assert bad["decision"] == "reject" and bad["metrics"]["loss"]["worse"]
    assert "held-out loss is worse" in bad["reasons"][0]
    assert good["decision"] == "promote", good["reasons"]

    # The registry records both; promotion serves the sound one by name, rollback is instant.
    bad_id = registry.create_candidate(store, name="textrepo-damaged", base_model="smollm2",
                                       adapter_path=damaged, dataset_card=data.card)
    registry.set_report(store, bad_id, bad)
    good_id = registry.create_candidate(store, name="textrepo-v1", base_model="smollm2",
                                        adapter_path=sound, dataset_card=data.card)
    registry.set_report(store, good_id, good)
    from inference.backends.transformers_backend import TransformersBackend

    backend = TransformersBackend(embedded_model_dir, model_name="smollm2-135m-instruct")
    out = registry.promote(settings, store, good_id, actor="test", backend=backend)
    assert out["serving"] == "loaded into the embedded backend"
    assert registry.active_version(store)["name"] == "textrepo-v1"
    assert registry.serving_model(settings, store, job_id=7) == "textrepo-v1"
    assert "textrepo-v1" in backend.adapters
    shown = registry.format_version(registry.get_version(store, good_id))
    assert "gate: promote" in shown and "loss" in shown
    rb = registry.rollback(settings, store, actor="test")
    assert rb == {"rolled_back": "textrepo-v1", "now_serving": "base model"}
    assert registry.serving_model(settings, store, job_id=7) == settings.backend.model


def test_the_trained_adapter_serves_in_vllm_by_name(trained, vllm_server):  # noqa: F811
    from bot import vllm

    adapter = trained["result"].adapter_dir
    store, data = trained["store"], trained["data"]
    version_id = registry.create_candidate(store, name="textrepo-vllm", base_model="smollm2",
                                           adapter_path=adapter, dataset_card=data.card)
    settings = make_settings(trained["root"] / "home-vllm", trained["settings"].database_url,
                             backend=BackendSettings(kind="openai", base_url=vllm_server.base_url,
                                                     model="smollm2-135m-instruct"))
    out = registry.promote(settings, store, version_id, actor="test")
    assert out["serving"].startswith("loaded into vLLM")
    assert "textrepo-vllm" in vllm.served_models(vllm_server.base_url)
    name = registry.serving_model(settings, store, job_id=1)
    assert name == "textrepo-vllm"
    with backend_for(vllm_server) as backend:
        gen = backend.generate(ASK, GenerationParams(max_tokens=16, model=name))
    assert gen.model == "textrepo-vllm" and gen.completion_tokens > 0
    vllm.unload_adapter(vllm_server.base_url, "textrepo-vllm")


def test_a_training_run_through_the_queue_trains_gates_and_reports(tmp_path, embedded_model_dir):
    """`codeloop.train` on huey: dataset → a few steps → gate → stored run and version."""
    import subprocess
    import sys

    from bot.runtime import build_queue, build_runtime
    from tests.support import cli_env
    from training import runs, schedule

    training = TrainingSettings(max_seq_len=512, holdout_share=0.3, grad_accum=1, max_steps=2,
                                learning_rate=1e-3, lora_rank=8, lora_alpha=16,
                                humaneval_subset=0, eval_generate=False, min_new_examples=3,
                                replay_jobs=1)
    settings = make_settings(tmp_path / "home", training=training)
    runtime = build_runtime(settings)
    repo = make_history(tmp_path, runtime.store)
    huey = build_queue(settings, lambda: runtime)
    huey.immediate = True
    run_id = schedule.retrain_now(settings, runtime.store, str(repo), "maintainer",
                                  enqueue=huey.codeloop_train)
    run = registry.last_training_run(runtime.store, str(repo))
    assert run["id"] == run_id and run["state"] == "succeeded", run["reason"]
    assert [p["step"] for p in run["losses"]] == [1, 2]
    assert run["dataset_card"]["kept"]["sft"] >= 3 and run["timings"]["train"] > 0
    version = registry.get_version(runtime.store, run["model_version_id"])
    assert version["metrics"]["gate"]["decision"] in ("promote", "reject")
    assert version["status"] == ("active" if version["metrics"]["gate"]["decision"] == "promote"
                                 else "rejected")
    assert run["reason"].startswith(("promoted", "rejected by the gate"))
    shown = subprocess.run([sys.executable, "-m", "bot.cli", "models", "show",
                            str(version["id"])], env=cli_env(settings), capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"version {version['id']}: {version['name']}" in shown.stdout
    assert "gate: " + version["metrics"]["gate"]["decision"] in shown.stdout
    assert "loss" in shown.stdout
    # The worker's gate tried the replay; this history has no test command to judge it by.
    assert version["metrics"]["gate"]["replay"] == {
        "skipped_reason": "the repository has no test_command in .codeloop.yml"}
    assert "replay: not measured (the repository has no test_command" in shown.stdout
    # The loss curve next to the run, drawn as the dashboard draws it.
    chart = (runs.run_dir(settings, run_id) / "loss.svg").read_text()
    assert chart.startswith("<svg") and chart.count("<circle") == 2
    print("\n" + shown.stdout)
    # A second run right away has no new merged changes: skipped, with the reason.
    second = schedule.retrain_now(settings, runtime.store, str(repo), "maintainer",
                                  enqueue=huey.codeloop_train)
    skipped = registry.last_training_run(runtime.store, str(repo))
    assert skipped["id"] == second and skipped["state"] == "skipped"
    assert skipped["reason"].startswith("only 0 new merged change(s) since")
    runtime.close()


def test_an_interrupted_run_resumes_from_its_last_checkpoint(trained, embedded_model_dir):
    """The run directory keeps checkpoints; training again continues after the last one."""
    run = trained["root"] / "run-resumed"
    shutil.copytree(trained["result"].adapter_dir.parent, run)
    shutil.rmtree(run / "adapter")
    assert (run / "checkpoints-sft" / "checkpoint-3").is_dir()
    result = train(trained["settings"], trained["data"], embedded_model_dir, run, max_steps=4)
    assert [p["step"] for p in result.losses] == [4]  # steps 1-3 were not trained again
    assert result.steps == 4 and (run / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("phase", ["dpo", "kto"])
def test_dpo_or_kto_follows_sft_when_there_are_enough_signals(phase, tmp_path, embedded_model_dir):
    thresholds = (dict(min_preference_pairs=1) if phase == "dpo"
                  else dict(min_preference_pairs=100, min_kto_examples=2))
    training = TrainingSettings(max_seq_len=512, holdout_share=0.3, grad_accum=1,
                                humaneval_subset=0, **thresholds)
    settings = make_settings(tmp_path / "home", training=training)
    store = Store(settings.database_url)
    repo = make_history(tmp_path, store)
    data = build_dataset(settings, store, str(repo))
    assert len(data.preference) == 1 and sorted(e.label for e in data.kto) == [False, True]
    result = train(settings, data, embedded_model_dir, tmp_path / "run", max_steps=1)
    assert result.phases == ["sft", phase]
    assert [(p["step"], p["phase"]) for p in result.losses] == [(1, "sft"), (2, phase)]
    check_adapter(result.adapter_dir)


TINY = dict(max_seq_len=512, holdout_share=0.3, grad_accum=1, learning_rate=1e-3, lora_rank=8,
            lora_alpha=16, humaneval_subset=0, eval_generate=False, eval_max_examples=2,
            min_new_examples=1)


def test_a_worker_killed_during_a_training_run_another_worker_finishes_it(tmp_path, db_url,
                                                                          embedded_model_dir):
    """SIGKILL (from inside, right after the first checkpoint) a real `codeloop worker` that
    is training: a second worker's recovery sweep takes the run over and resumes it from the
    checkpoint with the dataset it saved. One run, trained once per step."""
    import subprocess
    import sys

    from sqlalchemy import func, select

    from bot.runtime import build_queue, build_runtime
    from bot.store.models import TrainingRun
    from tests.support import cli_env, poll, rows
    from training import runs, schedule

    settings = make_settings(tmp_path / "home", db_url,
                             training=TrainingSettings(max_steps=2, **TINY))
    store = Store(settings.database_url)
    repo = make_history(tmp_path, store)
    huey = build_queue(settings, lambda: build_runtime(settings))
    run_id = schedule.retrain_now(settings, store, str(repo), "maintainer",
                                  enqueue=huey.codeloop_train)
    env = cli_env(settings)
    env.update({f"CODELOOP_TRAINING__{k.upper()}": str(v).lower() if isinstance(v, bool)
                else str(v) for k, v in {"max_steps": 2, **TINY}.items()})
    log_path = tmp_path / "workers.log"
    out_dir = runs.run_dir(settings, run_id)
    with open(log_path, "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"],
                                 env={**env, "CODELOOP_FAILPOINT": "kill:train:checkpoint"},
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = first.wait(timeout=600)
        finally:
            if first.poll() is None:
                first.kill()
        assert code == -9, log_path.read_text()
        with store.session() as s:
            run = s.get(TrainingRun, run_id)
            assert (run.state, run.runs) == ("running", 1)  # left behind by the dead worker
        assert (out_dir / "checkpoints-sft" / "checkpoint-1").is_dir()
        assert not (out_dir / "checkpoints-sft" / "checkpoint-2").exists()

        second = subprocess.Popen([sys.executable, "-m", "bot.cli", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            poll(lambda: rows(store, select(TrainingRun.state).where(TrainingRun.id == run_id))
                 in (["succeeded"], ["failed"], ["skipped"]), 600, 0.5)
        finally:
            second.terminate()
            second.wait(timeout=60)
    out = log_path.read_text()
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(TrainingRun)) == 1
        run = s.get(TrainingRun, run_id)
        assert run.state == "succeeded", (run.reason, out[-3000:])
        assert run.runs == 2 and run.lease_until is None
        assert [p["step"] for p in run.losses] == [2], run.losses  # step 1 was not redone
        assert run.model_version_id is not None
    assert "resuming SFT from" in out and "checkpoint-1" in out, out[-3000:]
    assert "training run %d: resumed" % run_id in out
    store.close()


def test_a_github_repository_trains_gates_and_promotes(tmp_path, db_url, embedded_model_dir):
    """The "done when" test: the local GitHub server's repository (codeloop's and a
    person's merged pull requests, one into a non-default branch, one reopened then merged)
    → dataset from the mirror → a few steps → the gate → promoted; on SQLite and PostgreSQL."""
    from tests.github_history import make_github_history
    from training import schedule

    h = make_github_history(tmp_path, db_url)
    env = h.env
    env.settings.training = TrainingSettings(max_steps=3, **TINY)
    store = env.runtime.store
    run_id = schedule.retrain_now(env.settings, store, env.repo.full_name, "alice",
                                  enqueue=env.huey.codeloop_train)
    env.work()
    run = registry.last_training_run(store, env.repo.full_name)
    assert run["id"] == run_id and run["state"] == "succeeded", run["reason"]
    card = run["dataset_card"]
    assert card["dropped_by_reason"].get("not_training_branch") == 1, card
    assert card["kept"]["sft"] >= 2 and card["kept"]["heldout"] == 1, card
    assert card["data_until"] == h.merged_at[h.c].isoformat()  # GitHub's time, not ours
    assert [p["step"] for p in run["losses"]] == [1, 2, 3]
    version = registry.get_version(store, run["model_version_id"])
    gate = version["metrics"]["gate"]
    assert gate["decision"] == "promote", gate
    assert version["status"] == "active" and run["reason"].startswith("promoted")
    assert registry.active_version(store)["name"] == version["name"]
    env.close()
