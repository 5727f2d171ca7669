"""Requirement tests: the stated examples, else a model-written test (stage
`requirement-test`), run against every candidate; the kept ones go into the commit."""

from __future__ import annotations

from pathlib import Path

from bot import reqtests
from bot.pipeline.base import Ports, backend_failed
from bot.pipeline.prompt import prefill
from bot.pipeline.results import JobInput, Plan
from bot.pipeline.stages import Stages
from bot.ports import BackendError, GenerationParams
from bot.settings import RepoConfig, Settings
from inference.edits import apply_edits


def requirement_test_spec(ports: Ports, stages: Stages, job: JobInput, workdir: Path,
                          plan: Plan, model_name: str) -> dict | None:
    """The requirement tests' sources for this job: stated examples, else a model-written test.

    A revision looks for examples in the review feedback. The model's test is a checkpointed
    stage (a resumed job does not ask again).
    """
    kind, requirement = job.kind, job.requirement
    mode = ports.settings.pipeline.requirement_tests_for(ports.settings.backend.kind)
    if mode == "off":
        return None
    text = job.feedback if kind == "revise" else requirement
    examples = reqtests.extract_examples(text or "")
    spec: dict = {"examples": [e.__dict__ for e in examples], "model_test": None, "notes": []}
    if examples or mode != "auto" or kind != "create":
        if not examples:
            spec["notes"].append("the requirement states no example" if kind == "create" else
                                 "the review states no example")
        return spec

    def stage_test() -> dict:
        docs = [(d.path, d.text) for d in plan.docs]
        where = reqtests.test_dir(workdir)
        messages = reqtests.model_test_prompt(requirement, docs, where)
        # Start the answer with the file's header and stop at its closing fence: a small
        # model then writes the test, not an essay (and costs one short generation).
        prefilled = prefill(ports.settings, "whole")
        params = GenerationParams(
            max_tokens=ports.settings.backend.max_new_tokens,
            temperature=ports.settings.backend.temperature, model=model_name,
            prefix=f"{where}test_requirement.py\n```python\n" if prefilled else "",
            stop=("```",) if prefilled else (),
        )
        try:
            gen = ports.backend().generate(messages, params)
        except BackendError as exc:
            if exc.retryable:
                raise backend_failed(exc) from exc
            return {"test": None, "why": f"the model backend failed: {exc}"}
        text = gen.text
        if prefilled and gen.finish_reason == "stop" and text.count("```") == 1:
            text = text.rstrip() + "\n```\n"
        test, why = reqtests.parse_model_test(text, workdir)
        # Its tokens count in the job's totals (stats, bench/replay.py) like any generation's.
        return {"test": test, "why": why, "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens}

    written = stages.run("requirement-test", stage_test, "writing a test of the requirement")
    spec["model_test"] = written["test"]
    if written["test"] is None:
        spec["notes"].append(f"the requirement states no example and {written['why']}")
    return spec


def prove(
    settings: Settings, workdir: Path, start_sha: str, edits, changed: list[str],
    config: RepoConfig, spec: dict, env_dir: Path | None = None,
) -> dict:
    """Run the requirement tests against the change (and against the code before it)."""
    examples = [reqtests.Example(**e) for e in spec["examples"]]

    def apply() -> None:
        apply_edits(edits, workdir, config)

    proof = reqtests.prove(
        workdir, start_sha, apply, changed, examples=examples, model_test=spec["model_test"],
        test_command=config.test_command, settings=settings.sandbox,
        secrets=settings.secret_values(), env_dir=env_dir,
    )
    proof["notes"] = spec["notes"] + proof["notes"]
    return proof


def add_requirement_tests(workdir: Path, validation: dict) -> list[str]:
    """Write the kept requirement tests into the tree being committed; their paths."""
    added = []
    for path, text in ((validation.get("proof") or {}).get("files") or {}).items():
        target = (workdir / path).resolve()
        if not target.is_relative_to(workdir.resolve()) or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        added.append(path)
    return added
