"""Learning-loop benchmark on a real repository's git history.

    python bench/learning.py REPO_PATH [--commits 40] [--steps 6] [--max-seq-len 384]
        [--replay-jobs N] [--test-command CMD]

Commits become merged changes (their messages the requirements), the dataset builder splits
them by time, codeloop's trainer trains on the older part, and the table shows the held-out
mean token loss before and after, and training tokens/s with the padding share against a
plain TRL `SFTTrainer` with its default settings (same data, same LoRA config, same number
of examples seen). With `--replay-jobs N` it also replays up to N held-out changes through the
whole pipeline with the base model and with the adapter, as the evaluation gate does
(training/evaluate.py `replay_resolved`, the core of bench/replay.py): the resolved share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.settings import EmbeddedSettings, Settings, StoreSettings, TrainingSettings  # noqa: E402
from bot.store.db import Store  # noqa: E402
from training.dataset import build_dataset  # noqa: E402
from training.sources import import_git_history  # noqa: E402


def heldout_loss(model_dir: Path, adapter: Path | None, examples, max_len: int) -> float:
    from training.evaluate import completion_loss, load_models

    loaded = load_models(model_dir, {"a": adapter} if adapter else {})
    losses = [completion_loss(loaded, "a" if adapter else None, ex, max_len) for ex in examples]
    return statistics.fmean([x for x in losses if x == x])


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def plain_sft(model_dir: Path, rows: list[dict], out: Path, examples_seen: int, cfg) -> dict:
    """TRL's SFTTrainer with its default settings (LoRA config as ours, CPU as available)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from training.train import TokenCounter, lora_config

    args = SFTConfig(output_dir=str(out), report_to=[], use_cpu=not torch.cuda.is_available())
    note = "defaults"
    if args.bf16 and not torch.cuda.is_available() and not cpu_has_bf16():
        # Emulated bf16 on a CPU without bf16 instructions takes tens of minutes a step.
        args.bf16 = False
        note = "defaults, bf16 off (this CPU has no bf16 instructions)"
    steps = max(1, examples_seen // (args.per_device_train_batch_size
                                     * args.gradient_accumulation_steps))
    args.max_steps = steps
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=Dataset.from_list(rows),
                         peft_config=lora_config(cfg))
    counter = TokenCounter(trainer.data_collator)

    def collate(features):  # report each batch as it is made: known even if its step never ends
        batch = counter(features)
        print("PLAIN_BATCH " + json.dumps({"tokens": counter.tokens,
                                           "positions": counter.positions}), flush=True)
        return batch

    trainer.data_collator = collate
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    from training.train import logged_tokens

    seen = logged_tokens(trainer)
    tokens, positions = counter.tokens, counter.positions
    if seen and tokens:
        tokens, positions = seen, round(seen * counter.positions / counter.tokens)
    return {"tokens": tokens, "positions": positions, "seconds": seconds,
            "steps": steps, "batch": args.per_device_train_batch_size,
            "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16, "note": note}


def plain_sft_bounded(model_dir: Path, rows: list[dict], out: Path, examples_seen: int,
                      cfg, budget: float) -> dict:
    """plain_sft in a child process, stopped after `budget` seconds. A run cut short reports
    what it knows: the padding share of the batches it made and an upper bound on tokens/s."""
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.json").write_text(json.dumps(rows))
    (out / "cfg.json").write_text(cfg.model_dump_json())
    cmd = [sys.executable, __file__, str(out), "--plain-child", str(out), str(model_dir),
           str(examples_seen)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        stdout, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
    seconds = time.perf_counter() - started
    done = [json.loads(line[12:]) for line in stdout.splitlines() if line.startswith("PLAIN_DONE ")]
    if done:
        return done[-1]
    batches = [json.loads(line[12:]) for line in stdout.splitlines()
               if line.startswith("PLAIN_BATCH ")]
    # The first batch only: the data loader may have made the next one while step 1 ran.
    first = batches[0] if batches else {"tokens": 0, "positions": 0}
    return {"tokens": first["tokens"], "positions": first["positions"], "seconds": seconds,
            "steps": 0, "batch": "8 (default)", "gradient_checkpointing": True, "bf16": False,
            "note": f"defaults, stopped after {budget:.0f} s before its first step ended",
            "bound": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("repo", type=Path)
    p.add_argument("--commits", type=int, default=40, help="newest N commits of the history")
    p.add_argument("--steps", type=int, default=6, help="codeloop trainer steps (batch 1)")
    p.add_argument("--max-seq-len", type=int, default=384)
    p.add_argument("--format", default="search_replace", choices=["whole", "search_replace"],
                   help="edit format of the answers (whole files rarely fit short sequences)")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--plain-budget", type=float, default=900,
                   help="seconds the plain SFTTrainer run may take before it is stopped")
    p.add_argument("--plain-child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--replay-jobs", type=int, default=0,
                   help="also replay up to N held-out changes through the whole pipeline with "
                   "the base model and with the adapter (the gate's resolved share)")
    p.add_argument("--test-command", default="python -m pytest -q -x -p no:cacheprovider",
                   help="the repository's test command for the replay (its .codeloop.yml's "
                   "when it has one)")
    args = p.parse_args(argv)
    if args.plain_child:
        out, model_dir, seen = Path(args.plain_child[0]), Path(args.plain_child[1]), \
            int(args.plain_child[2])
        cfg = TrainingSettings.model_validate_json((out / "cfg.json").read_text())
        rows = json.loads((out / "rows.json").read_text())
        print("PLAIN_DONE " + json.dumps(plain_sft(model_dir, rows, out / "run", seen, cfg)),
              flush=True)
        return 0

    from inference.backends.embedded import ensure_converted

    work = Path(tempfile.mkdtemp(prefix="codeloop-bench-learning-"))
    cfg = TrainingSettings(max_seq_len=args.max_seq_len, holdout_share=0.2, grad_accum=1,
                           batch_size=1, learning_rate=5e-4, humaneval_subset=0)
    settings = Settings(home=work / "home", store=StoreSettings(url=None), training=cfg,
                        embedded=EmbeddedSettings())
    model_dir, _ = ensure_converted(settings.embedded.cache_dir)
    store = Store(settings.database_url)
    repo = args.repo.resolve()
    added = import_git_history(store, repo, repo=str(repo), limit=args.commits)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    data = build_dataset(settings, store, str(repo), edit_format=args.format,
                         count_tokens=lambda t: len(tok(t, add_special_tokens=False)["input_ids"]))
    build_s = time.perf_counter() - started
    print(f"{repo}: {added} commits imported; dataset in {build_s:.1f} s: "
          f"{json.dumps(data.card['kept'])}; dropped {json.dumps(data.card['dropped_by_reason'])}")
    if not data.sft or not data.heldout:
        print("not enough examples to train and evaluate")
        return 1

    before = heldout_loss(model_dir, None, data.heldout, args.max_seq_len)
    from training.train import sft_rows, train

    result = train(settings, data, model_dir, work / "run", max_steps=args.steps)
    after = heldout_loss(model_dir, result.adapter_dir, data.heldout, args.max_seq_len)
    seen = args.steps * cfg.batch_size * cfg.grad_accum
    print()
    print(f"| held-out changes | {len(data.heldout)} (newest {cfg.holdout_share:.0%}) | "
          f"train examples | {len(data.sft)} |")
    print()
    print("| metric | base model | after codeloop LoRA |")
    print("|---|---|---|")
    print(f"| held-out mean token loss | {before:.4f} | {after:.4f} |", flush=True)
    plain = None if args.skip_plain else plain_sft_bounded(
        model_dir, sft_rows(data.sft), work / "plain", seen, cfg, args.plain_budget)
    print()
    print("| trainer | steps x batch | tokens | seconds | tokens/s | padding share |")
    print("|---|---|---|---|---|---|")
    print(f"| codeloop (batch 1, no padding, no checkpointing on CPU) | {result.steps} x "
          f"{cfg.batch_size} | {result.tokens} | {result.seconds:.1f} | "
          f"{result.tokens_per_second:.1f} | {result.padding_share:.1%} |")
    if plain:
        share = 1 - plain["tokens"] / plain["positions"] if plain["positions"] else 0.0
        rate = plain["tokens"] / plain["seconds"] if plain["seconds"] else 0.0
        if plain.get("bound"):  # the batch was made (its padding is known), the step not done
            rate_text, secs = f"< {rate:.1f} (bound)", f"> {plain['seconds']:.0f}"
        else:
            rate_text, secs = f"{rate:.1f}", f"{plain['seconds']:.1f}"
        print(f"| TRL SFTTrainer {plain['note']} (gradient checkpointing "
              f"{plain['gradient_checkpointing']}, bf16 {plain['bf16']}) | {plain['steps']} x "
              f"{plain['batch']} | {plain['tokens']} | {secs} | {rate_text} | {share:.1%} |")
    if args.replay_jobs:
        replay_heldout(settings, repo, data, model_dir, result.adapter_dir, args.replay_jobs,
                       args.test_command, work / "replay")
    return 0


def replay_heldout(settings: Settings, repo: Path, data, model_dir: Path, adapter: Path,
                   jobs: int, test_command: str, work: Path) -> None:
    """Resolved share on the held-out (newest) changes, base vs adapter, measured as the
    evaluation gate measures it."""
    from bot.replay_jobs import gate_runners
    from bot.settings import parse_repo_config
    from training.sources import repo_config_at
    from training.evaluate import replay_resolved

    config = repo_config_at(repo, None)
    if not config.test_command:
        config = parse_repo_config(f"test_command: {test_command}\n")
    cfg = settings.model_copy(update={"training": settings.training.model_copy(
        update={"replay_jobs": jobs})})
    started = time.perf_counter()
    out = replay_resolved(cfg, repo, data.heldout, {"base": None, "adapter": adapter},
                          model_dir, gate_runners(cfg), config, work)
    seconds = time.perf_counter() - started
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(out.get("skipped", {}).items()))
    print(f"\nreplay of the {len(data.heldout)} held-out changes (up to {jobs}; "
          f"test command `{config.test_command}`): {out.get('n', 0)} kept; skipped: "
          f"{skipped or 'none'}; {seconds:.0f} s")
    if not out.get("resolved"):
        print(f"replay: no resolved share ({out.get('skipped_reason')})")
        return
    base, tuned = out["resolved"]["base"], out["resolved"]["adapter"]
    print()
    print("| metric | base model | after codeloop LoRA |")
    print("|---|---|---|")
    print(f"| replay resolved share | {sum(base)}/{len(base)} | {sum(tuned)}/{len(tuned)} |")
    for sha, b_end, a_end in zip(out["tasks"], out["ends"]["base"], out["ends"]["adapter"],
                                 strict=True):
        print(f"  {sha[:10]}  base: {b_end}  adapter: {a_end}")


if __name__ == "__main__":
    sys.exit(main())
