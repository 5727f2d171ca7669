"""The embedded backend: the real SmolLM2-135M model, its safetensors cache, streaming, stop
strings, and a PEFT LoRA adapter on top."""

from __future__ import annotations

import pytest

from bot.ports import BackendError, ContextTooLong, GenerationParams, Message
from inference.backends.embedded import EMBEDDED_MODEL_NAME, ensure_converted, is_converted
from inference.backends.transformers_backend import TransformersBackend
from tests.support import model_cache_dir

pytestmark = pytest.mark.model

PROMPT = [Message("user", "Write a Python function add(a, b) that returns the sum.")]


def test_cache_is_reused_and_complete(embedded_model_dir):
    assert is_converted(model_cache_dir())
    path, seconds = ensure_converted(model_cache_dir())
    assert path == embedded_model_dir and seconds is None  # warm: no second conversion
    assert (path / "config.json").exists() and (path / "tokenizer.json").exists()


def test_streaming_generation_matches_the_collected_answer(embedded_backend):
    params = GenerationParams(max_tokens=24)
    pieces = list(embedded_backend.stream(PROMPT, params))
    gen = embedded_backend.generate(PROMPT, params)
    assert len(pieces) > 1
    assert "".join(pieces) == gen.text  # greedy: the same answer both ways
    assert gen.completion_tokens == 24 and gen.finish_reason == "length"
    assert gen.model == EMBEDDED_MODEL_NAME


def test_stop_string_and_prefix(embedded_backend):
    prefix = "```python\ndef add(a, b):\n"
    gen = embedded_backend.generate(
        PROMPT, GenerationParams(max_tokens=48, prefix=prefix, stop=("\n\n",))
    )
    assert gen.text.startswith(prefix)
    assert "\n\n" not in gen.text[len(prefix):]
    assert gen.finish_reason == "stop"


def test_prompt_longer_than_the_context_is_refused(embedded_model_dir):
    small = TransformersBackend(embedded_model_dir, model_name=EMBEDDED_MODEL_NAME, context_tokens=64)
    with pytest.raises(ContextTooLong, match="context is 64 tokens"):
        small.generate([Message("user", "word " * 200)], GenerationParams(max_tokens=8))


def test_peft_adapter_loads_and_changes_the_answer(embedded_model_dir, embedded_backend, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    config = LoraConfig(
        r=8, lora_alpha=64, init_lora_weights=False, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    adapter_dir = tmp_path / "adapter-v1"
    get_peft_model(base, config).save_pretrained(adapter_dir)

    tuned = TransformersBackend(embedded_model_dir, model_name=EMBEDDED_MODEL_NAME,
                                adapter_path=adapter_dir)
    params = GenerationParams(max_tokens=16)
    with_adapter = tuned.generate(PROMPT, params)
    without = embedded_backend.generate(PROMPT, params)
    assert with_adapter.model == "adapter-v1"
    assert with_adapter.completion_tokens > 0
    assert with_adapter.text != without.text  # the adapter's (random) weights are in use


CAPITAL = [Message("user", "What is the capital city of France? Answer with the city name.")]
OPTIONS = ["Banana", "Paris", "Seventeen"]


def test_a_constrained_choice_is_always_one_of_the_options(embedded_backend):
    from inference.structured import choose

    assert choose(embedded_backend, CAPITAL, OPTIONS) == "Paris"
    gen = embedded_backend.generate(CAPITAL, GenerationParams(max_tokens=8, choice=("no", "yes")))
    assert gen.text in ("no", "yes")
    with pytest.raises(BackendError, match="choices only"):
        embedded_backend.generate(CAPITAL, GenerationParams(max_tokens=8, regex="[0-9]+"))
