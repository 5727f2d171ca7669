"""Generation on the CPU (or a local GPU) with transformers: the embedded default backend."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bot.ports import BackendError, ContextTooLong, Generation, GenerationParams, Message
from inference.backends import generation

log = logging.getLogger(__name__)


class TransformersBackend:
    """A causal LM loaded from a local directory, optionally with a PEFT LoRA adapter.

    `stream()` runs `generate` on a background thread and yields text as it is produced.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        model_name: str,
        adapter_path: Path | None = None,
        context_tokens: int | None = None,
        threads: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model_name = model_name
        if adapter_path is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_path))
            self.model_name = Path(adapter_path).name
        model.eval()
        self.model = model
        # The model's own limit (SmolLM2-135M: 8,192), or less if the settings cap it.
        own = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2048
        self.context_tokens = min(own, context_tokens) if context_tokens else own
        self.load_seconds = time.perf_counter() - started
        self.name = f"transformers:{self.model_name}"
        self._lock = threading.Lock()  # one generation at a time on one CPU model
        self.base_name = model_name
        self.adapters: dict[str, Path] = {}  # loaded by name (training/registry promotions)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter next to the others; `GenerationParams.model=name` uses it."""
        from peft import PeftModel

        with self._lock:
            if name in self.adapters:
                return
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                self.model.eval()
            self.adapters[name] = Path(path)

    def _selection(self, model: str | None):
        """(context that selects the model, name it answers as) for a requested model name.

        Only names loaded with `load_adapter` (and the base name next to them) select;
        anything else keeps the default, as before."""
        import contextlib

        if model and model in self.adapters:
            self.model.set_adapter(model)
            return contextlib.nullcontext(), model
        if model and model == self.base_name and self.adapters:
            return self.model.disable_adapter(), model
        return contextlib.nullcontext(), self.model_name

    # ------------------------------------------------------------------ helpers
    def context_window(self, model: str | None = None) -> int:
        """Prompt + answer tokens the model takes (adapters share the base model's)."""
        return self.context_tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, messages: list[Message], prefix: str) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        return (
            self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            + prefix
        )

    # ------------------------------------------------------------------ Backend
    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[str]:
        for piece in self._run(messages, params, stats={}):
            yield piece

    def _choose(self, prompt: str, options: tuple[str, ...], stats: dict) -> str:
        """The option the model finds most likely (sum of token log-probabilities).

        A constrained choice, as vLLM's `structured_outputs.choice` gives: the answer is
        always exactly one of the options.
        """
        import torch

        base = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        best, best_score = options[0], float("-inf")
        with self._lock, torch.inference_mode():
            for option in options:
                ids = self.tokenizer(prompt + option, add_special_tokens=False)["input_ids"]
                if len(ids) > self.context_tokens:
                    raise ContextTooLong(
                        f"the prompt and the option have {len(ids)} tokens; the model's context "
                        f"is {self.context_tokens} tokens"
                    )
                start = len(base)
                while start > 0 and ids[:start] != base[:start]:  # merges at the boundary
                    start -= 1
                logits = self.model(torch.tensor([ids])).logits[0, :-1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                target = torch.tensor(ids[1:])
                picked = logprobs[torch.arange(len(ids) - 1), target][start - 1 :]
                score = float(picked.sum())
                if score > best_score:
                    best, best_score = option, score
        stats.update(prompt_tokens=len(base), completion_tokens=len(
            self.tokenizer(best, add_special_tokens=False)["input_ids"]), finish_reason="stop")
        return best

    def _run(self, messages: list[Message], params: GenerationParams, stats: dict) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        prompt = self._prompt(messages, params.prefix)
        if params.regex:
            raise BackendError(
                "regex-constrained answers need an OpenAI-compatible server with structured "
                "outputs (vLLM); the embedded backend supports choices only"
            )
        if params.choice:
            yield self._choose(prompt, params.choice, stats)
            return
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        room = self.context_tokens - prompt_tokens
        if room < 16:
            raise ContextTooLong(
                f"the prompt has {prompt_tokens} tokens; the model's context is "
                f"{self.context_tokens} tokens"
            )
        max_new = min(params.max_tokens, room)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            **inputs,
            max_new_tokens=max_new,
            streamer=streamer,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature)
        else:
            kwargs.update(do_sample=False)
        if params.stop:
            kwargs.update(stopping_criteria=[_StopOnText(self.tokenizer, prompt_tokens, params.stop)])
        result: dict = {}

        def work() -> None:
            try:
                with selected, torch.inference_mode():
                    result["output"] = self.model.generate(**kwargs)
            except BaseException as exc:  # reported on the caller's thread
                result["error"] = exc
                streamer.end()

        with self._lock:
            selected, stats["model"] = self._selection(params.model)
            thread = threading.Thread(target=work, name="generate", daemon=True)
            thread.start()
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
        if "error" in result:
            raise result["error"]
        completion = int(result["output"].shape[1]) - prompt_tokens
        stats.update(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            finish_reason="length" if completion >= max_new else "stop",
        )

    def generate(
        self,
        messages: list[Message],
        params: GenerationParams,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        # Stop strings are part of the output in transformers: the answer is cut at them.
        return generation(lambda stats: self._run(messages, params, stats), params,
                          self.model_name, on_text, stops_in_output=True)


class _StopOnText:
    """Stops when a stop string appears in the generated text (never in the prompt, unlike
    transformers' stop_strings, which also match across the prompt boundary). OpenAI-style
    servers match stop strings the same way."""

    def __init__(self, tokenizer, prompt_tokens: int, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.stops = stops

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_tokens :], skip_special_tokens=True)
        done = any(stop in text for stop in self.stops)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)
