"""The edit formats: their instructions, and which one a model is asked for by default."""

from __future__ import annotations

import re

from inference.prompts_formats import INSTRUCTIONS

FORMATS: tuple[str, ...] = ("whole", "search_replace")


# ================================================================ format choice


def describe_format(fmt: str) -> str:
    """Instructions for the system prompt, with a tiny example, for edit format `fmt`."""
    try:
        return INSTRUCTIONS[fmt]
    except KeyError:
        raise ValueError(
            f"unknown edit format {fmt!r}; expected one of {', '.join(FORMATS)}"
        ) from None


_SIZE = re.compile(r"(?<![\w.])(?:\d+x)?(\d+(?:\.\d+)?)([bm])(?![a-z])")
_SMALL_FAMILIES = ("smollm", "tinyllama", "tiny-", "tiny_", "nano")


def default_format_for(model_name: str) -> str:
    """"whole" for small models (3B parameters or fewer by the name), else "search_replace".

    The size comes from the name (135m, 1.7b, qwen2.5-coder-32b, 8x7b); the largest figure
    counts. A name without a size is small only if it names a small family (smollm,
    tinyllama); any other unknown model gets search_replace.
    """
    name = model_name.lower().rsplit("/", 1)[-1]
    sizes = []
    for m in _SIZE.finditer(name.replace("_", "-")):
        value = float(m.group(1))
        sizes.append(value / 1000 if m.group(2) == "m" else value)
    if sizes:
        return "whole" if max(sizes) <= 3 else "search_replace"
    if any(f in model_name.lower() for f in _SMALL_FAMILIES):
        return "whole"
    return "search_replace"
