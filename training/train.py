"""Trainer: LoRA with TRL + PEFT. SFT first, then DPO (or KTO) when there are enough signals.

data → loop → artifact: `train(settings, data, base_model, out_dir)` trains one adapter and
returns a `TrainResult`. The adapter is one vLLM can load at runtime: LoRA on all seven
projection modules, rank ≤ 16 by default, no `modules_to_save`, no new tokens.

Tiny runs work on the CPU (bf16 and gradient checkpointing off); on GPUs run the same code
under `accelerate launch -m training.train DATASET_DIR BASE_MODEL OUT_DIR` (one or many GPUs).
A progress bar shows while training; the loss of every step is logged, kept in the result and
drawn to `loss.svg` (the dashboard's chart, training/chart.py); a run that is interrupted resumes from its last checkpoint.

torch, transformers, trl and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bot.settings import Settings, TrainingSettings
from training.examples import Example, TrainingData

log = logging.getLogger(__name__)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainResult:
    adapter_dir: Path
    losses: list[dict] = field(default_factory=list)  # [{"step", "loss", "phase"}]
    phases: list[str] = field(default_factory=list)  # sft, then dpo or kto
    steps: int = 0
    tokens: int = 0  # real (non-padding) tokens trained on
    padded_tokens: int = 0  # all positions in the batches, padding included
    seconds: float = 0.0
    loss_chart: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding_share(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def summary(self) -> dict:
        return {
            "adapter_dir": str(self.adapter_dir), "phases": self.phases, "steps": self.steps,
            "tokens": self.tokens, "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "padding_share": round(self.padding_share, 4),
        }


def lora_config(cfg: TrainingSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.05, bias="none",
        task_type="CAUSAL_LM", target_modules=list(TARGET_MODULES),
    )


def check_adapter(adapter_dir: Path, max_rank: int = 16) -> dict:
    """The adapter's config, or ValueError when vLLM could not serve it."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    problems = []
    if sorted(config.get("target_modules") or []) != sorted(TARGET_MODULES):
        problems.append(f"target modules {config.get('target_modules')} "
                        "are not the seven projections")
    if int(config.get("r", 0)) > max_rank:
        problems.append(f"rank {config.get('r')} is above {max_rank}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} "
                        "(vLLM loads LoRA weights only)")
    if not (Path(adapter_dir) / "adapter_model.safetensors").exists():
        problems.append("no adapter_model.safetensors")
    if problems:
        raise ValueError(f"adapter at {adapter_dir} cannot be served: " + "; ".join(problems))
    return config


# ---------------------------------------------------------------- datasets in TRL's formats


def sft_rows(examples: list[Example]) -> list[dict]:
    return [{"prompt": ex.prompt, "completion": [{"role": "assistant", "content": ex.completion}]}
            for ex in examples]


def dpo_rows(examples: list[Example]) -> list[dict]:
    return [{"prompt": ex.prompt, "chosen": [{"role": "assistant", "content": ex.chosen}],
             "rejected": [{"role": "assistant", "content": ex.rejected}]} for ex in examples]


def kto_rows(examples: list[Example]) -> list[dict]:
    return [{"prompt": ex.prompt, "completion": [{"role": "assistant", "content": ex.completion}],
             "label": bool(ex.label)} for ex in examples]


# ---------------------------------------------------------------- helpers


class TokenCounter:
    """Wraps a data collator and counts real and padded token positions of every batch."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens = 0
        self.positions = 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if mask is not None:
            self.tokens += int(mask.sum())
            self.positions += int(mask.numel())
        elif ids is not None:
            n = int(ids.numel())
            if "position_ids" in batch:  # padding-free: every position is a real token
                self.tokens += n
                self.positions += n
            else:
                self.tokens += n
                self.positions += n
        return batch


def _loss_callback(losses: list[dict], phase: str, offset: list[int]):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                step = offset[0] + state.global_step
                losses.append({"step": step, "loss": float(logs["loss"]), "phase": phase})
                log.info("%s step %d: loss %.4f", phase, step, logs["loss"])

    return LossLog()


def _save_callback(hook: Callable[[], None]):
    from transformers import TrainerCallback

    class AfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            hook()

    return AfterSave()


def _common_args(cfg: TrainingSettings, out: Path, steps: int | None, cpu: bool) -> dict:
    if steps is None and cfg.max_steps > 0:  # a short run set in the settings
        steps = cfg.max_steps
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=steps if steps is not None else cfg.max_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=max(1, (steps or 50) // 2) if steps else 50,
        save_total_limit=2,
        report_to=[],
        bf16=False if cpu else _bf16_ok(),
        fp16=False,
        gradient_checkpointing=False if cpu else True,
        use_cpu=cpu,
        disable_tqdm=False,
        seed=0,
        lr_scheduler_type="constant_with_warmup" if steps and steps < 20 else "cosine",
        warmup_steps=0 if steps and steps < 20 else 10,
        dataloader_num_workers=0,
    )


def logged_tokens(trainer) -> int:
    """Tokens the trainer reports it trained on (TRL logs `num_tokens`), or 0."""
    seen = [float(h["num_tokens"]) for h in trainer.state.log_history if "num_tokens" in h]
    return int(max(seen)) if seen else 0


def _bf16_ok() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _last_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not out.is_dir():
        return None
    return get_last_checkpoint(str(out))


def plot_losses(losses: list[dict], path: Path, title: str = "training loss") -> Path | None:
    """The loss curve as the dashboard draws it, written to `path` (an SVG file)."""
    if not losses:
        return None
    from training.chart import loss_chart_svg

    path.write_text(loss_chart_svg([(p["step"], p["loss"]) for p in losses], title=title))
    return path


# ---------------------------------------------------------------- the loop


def train(
    settings: Settings,
    data: TrainingData,
    base_model: Path,
    out_dir: Path,
    *,
    max_steps: int | None = None,
    preference_steps: int | None = None,
    on_checkpoint: Callable[[], None] | None = None,
) -> TrainResult:
    """Train one LoRA adapter: SFT on `data.sft`, then DPO or KTO when the signals suffice.

    Checkpoints go to `out_dir/checkpoints-<phase>`; calling this again with the same
    `out_dir` after an interruption resumes from the newest checkpoint. The adapter is
    saved to `out_dir/adapter`, the losses to `out_dir/losses.json` and `out_dir/loss.svg`.
    `on_checkpoint` is called after each checkpoint is written (the run's failpoint).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cfg = settings.training
    if not data.sft:
        raise ValueError("no SFT examples to train on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = not torch.cuda.is_available()
    if cpu and settings.embedded.threads:
        torch.set_num_threads(settings.embedded.threads)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    vocab = len(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        base_model,
        dtype=torch.float32 if cpu else (torch.bfloat16 if _bf16_ok() else torch.float16),
    )
    result = TrainResult(adapter_dir=out_dir / "adapter")
    offset = [0]
    started = time.perf_counter()

    # 1. SFT ---------------------------------------------------------------
    sft_out = out_dir / "checkpoints-sft"
    args = SFTConfig(**_common_args(cfg, sft_out, max_steps, cpu), max_length=cfg.max_seq_len,
                     completion_only_loss=True, packing=False)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(sft_rows(data.sft)),
        processing_class=tokenizer, peft_config=lora_config(cfg),
        callbacks=[_loss_callback(result.losses, "sft", offset)]
        + ([_save_callback(on_checkpoint)] if on_checkpoint else []),
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    resume = _last_checkpoint(sft_out)
    if resume:
        log.info("resuming SFT from %s", resume)
    state = trainer.train(resume_from_checkpoint=resume)
    result.phases.append("sft")
    result.steps += trainer.state.global_step
    offset[0] = result.steps
    peft_model = trainer.model
    del state

    # 2. DPO or KTO --------------------------------------------------------------
    phase = None
    if len(data.preference) >= cfg.min_preference_pairs:
        phase = "dpo"
    elif len(data.kto) >= cfg.min_kto_examples and {e.label for e in data.kto} == {True, False}:
        phase = "kto"
    if phase:
        steps = preference_steps if preference_steps is not None else max_steps
        pout = out_dir / f"checkpoints-{phase}"
        common = _common_args(cfg, pout, steps, cpu)
        common["learning_rate"] = cfg.learning_rate / 4
        if phase == "dpo":
            from trl import DPOConfig, DPOTrainer

            ptrainer = DPOTrainer(
                model=peft_model, args=DPOConfig(**common, max_length=cfg.max_seq_len),
                train_dataset=Dataset.from_list(dpo_rows(data.preference)),
                processing_class=tokenizer,
                callbacks=[_loss_callback(result.losses, phase, offset)],
            )
        else:
            from trl import KTOConfig, KTOTrainer

            # KTO's KL term compares examples within a batch: it needs two or more.
            common["per_device_train_batch_size"] = max(2, cfg.batch_size)

            ptrainer = KTOTrainer(
                model=peft_model, args=KTOConfig(**common, max_length=cfg.max_seq_len),
                train_dataset=Dataset.from_list(kto_rows(data.kto)),
                processing_class=tokenizer,
                callbacks=[_loss_callback(result.losses, phase, offset)],
            )
        pcounter = TokenCounter(ptrainer.data_collator)
        ptrainer.data_collator = pcounter
        ptrainer.train(resume_from_checkpoint=_last_checkpoint(pout))
        result.phases.append(phase)
        result.steps += ptrainer.state.global_step
        peft_model = ptrainer.model
        counter.tokens += pcounter.tokens
        counter.positions += pcounter.positions

    result.seconds = time.perf_counter() - started
    result.tokens, result.padded_tokens = counter.tokens, counter.positions
    seen = logged_tokens(trainer)  # the trainer's own count of tokens it trained on
    if seen and not phase and counter.tokens:
        result.padded_tokens = round(seen * counter.positions / counter.tokens)
        result.tokens = seen
    if len(tokenizer) != vocab:
        raise RuntimeError("training added tokens to the tokenizer; vLLM adapters cannot")
    peft_model.save_pretrained(str(result.adapter_dir))
    check_adapter(result.adapter_dir, max_rank=max(16, cfg.lora_rank))
    (out_dir / "losses.json").write_text(json.dumps(result.losses))
    (out_dir / "train_summary.json").write_text(json.dumps(result.summary(), indent=2))
    result.loss_chart = plot_losses(result.losses, out_dir / "loss.svg",
                                  f"{data.repo}: {' + '.join(result.phases)}")
    data.save(out_dir / "dataset")
    return result


def load_saved(dataset_dir: Path) -> TrainingData:
    """A dataset saved by `TrainingData.save` (for `accelerate launch` runs)."""
    from datetime import datetime

    def read(name: str) -> list[Example]:
        out = []
        path = Path(dataset_dir) / f"{name}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            row["when"] = datetime.fromisoformat(row["when"]) if row.get("when") else None
            out.append(Example(**row))
        return out

    card = json.loads((Path(dataset_dir) / "dataset_card.json").read_text())
    return TrainingData(repo=card.get("repo", ""), edit_format=card.get("edit_format", "whole"),
                        sft=read("sft"), heldout=read("heldout"), preference=read("preference"),
                        kto=read("kto"), card=card, data_until=None)


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m training.train DATASET_DIR BASE_MODEL OUT_DIR [--max-steps N]`."""
    p = argparse.ArgumentParser(prog="python -m training.train")
    p.add_argument("dataset_dir")
    p.add_argument("base_model")
    p.add_argument("out_dir")
    p.add_argument("--max-steps", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(Settings(), load_saved(Path(args.dataset_dir)), Path(args.base_model),
                   Path(args.out_dir), max_steps=args.max_steps)
    print(json.dumps(result.summary(), indent=2))
    return 0 if not math.isnan(result.losses[-1]["loss"] if result.losses else 0.0) else 1


if __name__ == "__main__":
    sys.exit(main())
