"""Stage `generate-N` (one answer, or N candidates to one prompt), and each answer turned
into an edit in a format the parser reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bot import git
from bot.pipeline.base import Ports, backend_failed
from bot.pipeline.prompt import MODE_FORMAT
from bot.pipeline.results import Generation, Plan, Strategy
from bot.ports import BackendError, GenerationParams
from inference.edits import Definition, definition_answer
from inference.prompts import Prompt


def generate(ports: Ports, prompt: Prompt, model_name: str, n: int,
             strategy: Strategy) -> Generation:
    """Stage `generate-N`: N candidates when best of N is on, else one answer at the
    strategy's temperature."""
    if n > 1:
        gen = _generate_candidates(ports, prompt, model_name, n)
    else:
        gen = _generate(ports, prompt, model_name, strategy.temperature)
    return Generation(**gen, strategy=strategy)


def _closed(prompt: Prompt, text: str, finish_reason: str) -> str:
    if prompt.stop and finish_reason == "stop" and "```" in prompt.stop:
        return text.rstrip() + "\n```\n"  # a stop string ended the prefilled file
    return text


def _generate(ports: Ports, prompt: Prompt, model_name: str,
              temperature: float | None = None) -> dict:
    settings = ports.settings
    backend = ports.backend()
    params = GenerationParams(
        max_tokens=settings.backend.max_new_tokens,
        temperature=settings.backend.temperature if temperature is None else temperature,
        stop=prompt.stop,
        prefix=prompt.prefix,
        model=model_name,
    )
    try:
        gen = backend.generate(prompt.messages, params)
    except BackendError as exc:
        raise backend_failed(exc) from exc
    return {
        "text": _closed(prompt, gen.text, gen.finish_reason), "model": gen.model,
        "prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
        "seconds": round(gen.seconds, 3), "finish_reason": gen.finish_reason,
    }


def _generate_candidates(ports: Ports, prompt: Prompt, model_name: str, n: int) -> dict:
    """N answers to one prompt: one batched request where the backend takes `n` (the OpenAI
    API), else N generations, the first at the configured temperature and the rest sampled."""
    settings = ports.settings
    backend = ports.backend()
    params = GenerationParams(
        max_tokens=settings.backend.max_new_tokens,
        temperature=max(settings.backend.temperature, settings.pipeline.candidate_temperature),
        stop=prompt.stop, prefix=prompt.prefix, model=model_name,
    )
    try:
        if hasattr(backend, "generate_n"):
            gens = backend.generate_n(prompt.messages, params, n)
        else:
            first = GenerationParams(**{**params.__dict__,
                                        "temperature": settings.backend.temperature})
            gens = [backend.generate(prompt.messages, first if i == 0 else params)
                    for i in range(n)]
    except BackendError as exc:
        raise backend_failed(exc) from exc
    candidates = [{"text": _closed(prompt, gen.text, gen.finish_reason),
                   "completion_tokens": gen.completion_tokens,
                   "finish_reason": gen.finish_reason} for gen in gens]
    return {
        "text": candidates[0]["text"], "model": gens[0].model,
        "prompt_tokens": gens[0].prompt_tokens,
        "completion_tokens": sum(g.completion_tokens for g in gens),
        "seconds": round(max(g.seconds for g in gens) if hasattr(backend, "generate_n")
                         else sum(g.seconds for g in gens), 3),
        "finish_reason": gens[0].finish_reason, "candidates": candidates,
    }


def answer_in_format(plan: Plan, mode: str, text: str, workdir: Path,
                     start_sha: str) -> tuple[str, str]:
    """The answer as an edit in a format the parser reads, and that format. A definition
    written after its prefilled head becomes a search/replace of that one definition."""
    if mode in ("append", "definition"):
        start = (plan.append_prefix if mode == "append" else
                 f"{plan.definition['path']}\n```python\n{plan.definition['head']}")
        if not text.startswith(start):  # a backend that ignored the prefill: a whole answer
            return text, "whole"
    if mode == "append":
        added = text[len(plan.append_prefix):]
        added = added.split("```", 1)[0].strip("\n")
        if not added.strip():
            return "", "search_replace"
        return (f"{plan.target}\n<<<<<<< SEARCH\n=======\n\n\n{added}\n>>>>>>> REPLACE\n",
                "search_replace")
    if mode != "definition":
        return text, MODE_FORMAT[mode]
    d = plan.definition
    original = git.show_file(workdir, start_sha, d["path"]) or ""
    fields = {k: d[k] for k in ("name", "start", "body", "end", "indent", "stub", "kind")}
    written = text.split("\n", 2)[2] if text.count("\n") >= 2 else ""
    return definition_answer(d["path"], original, Definition(**fields), written), "search_replace"


def answer_sha(answer: str) -> str:
    norm = "\n".join(line.rstrip() for line in answer.strip().splitlines())
    return hashlib.sha256(norm.encode()).hexdigest()[:16]
