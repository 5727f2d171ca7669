"""`codeloop vllm serve`: vLLM's OpenAI-compatible server on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.commands import fail, say
from bot.settings import Settings


def cmd_vllm(args: argparse.Namespace, settings: Settings) -> int:
    """`codeloop vllm serve`: vLLM on the embedded model in the foreground, until Ctrl-C."""
    from bot import vllm

    try:
        venv = Path(args.venv) if args.venv else None
        if args.install:
            vllm.ensure_venv(venv)
        proc = vllm.serve(
            settings, model_dir=Path(args.model_dir) if args.model_dir else None,
            port=args.port, host=args.host, venv=venv,
        )
    except vllm.VLLMError as exc:
        return fail(str(exc))
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base_url = f"http://{host}:{args.port}/v1"
    say(f"starting vLLM (log: {proc.log_path})")

    def _terminated(signum, frame):  # `kill` stops the server too, as Ctrl-C does
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        seconds = vllm.wait_healthy(base_url, args.timeout, process=proc)
        say(f"vLLM is healthy after {seconds:.0f} s at {base_url}")
        say(f"serving: {', '.join(vllm.served_models(base_url))}")
        say(f"use it with CODELOOP_BACKEND__KIND=openai CODELOOP_BACKEND__BASE_URL={base_url}")
        code = proc.wait()
        if code:
            return fail(f"vLLM exited with status {code}; see {proc.log_path}", code=1)
        return 0
    except vllm.VLLMError as exc:
        return fail(str(exc), code=1)
    except KeyboardInterrupt:
        return 0
    finally:
        vllm.stop(proc)


def register(sub) -> None:
    vllm = sub.add_parser("vllm", help="vLLM's OpenAI-compatible server on this machine")
    vllm_sub = vllm.add_subparsers(dest="vllm_command", required=True)
    vserve = vllm_sub.add_parser("serve", help="serve the model with runtime LoRA, in the foreground")
    vserve.add_argument("--port", type=int, default=8000)
    vserve.add_argument("--host", default="127.0.0.1")
    vserve.add_argument("--model-dir", help="a safetensors model directory (default: the embedded model)")
    vserve.add_argument("--venv", help="the vLLM environment (default: $CODELOOP_VLLM_VENV or "
                        "~/.cache/codeloop/vllm-venv)")
    vserve.add_argument("--install", action="store_true", help="create the vLLM environment first")
    vserve.add_argument("--timeout", type=float, default=900, help="seconds to wait for health")
    vserve.set_defaults(fn=cmd_vllm)
