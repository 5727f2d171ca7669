#!/usr/bin/env bash
# vLLM on a GPU host: the OpenAI-compatible server codeloop talks to, with runtime LoRA.
#
#   pip install 'codeloop[gpu]'        # or: pip install vllm   (the PyPI vllm package is the CUDA build)
#   MODEL=/models/base SERVED_NAME=base deploy/vllm/serve-gpu.sh
#
# Then point codeloop at it:
#   CODELOOP_BACKEND__KIND=openai CODELOOP_BACKEND__BASE_URL=http://HOST:8000/v1 CODELOOP_BACKEND__MODEL=base
# and promote adapters with POST /v1/load_lora_adapter {"lora_name": ..., "lora_path": ...}.
#
# Every setting is an environment variable; extra arguments go to vLLM unchanged.
set -euo pipefail

: "${MODEL:?set MODEL to a model directory or a Hugging Face model id}"
SERVED_NAME="${SERVED_NAME:-smollm2-135m-instruct}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"
PYTHON="${PYTHON:-python3}"
TENSOR_PARALLEL_SIZE="${TENSOR_PARALLEL_SIZE:-1}"      # GPUs one replica spans
GPU_MEMORY_UTILIZATION="${GPU_MEMORY_UTILIZATION:-0.90}" # share of each GPU's memory vLLM may take
MAX_MODEL_LEN="${MAX_MODEL_LEN:-8192}"                  # context window (prompt + answer)
MAX_LORA_RANK="${MAX_LORA_RANK:-16}"                    # at least the largest adapter's rank
MAX_LORAS="${MAX_LORAS:-4}"                             # adapters one batch may mix
MAX_CPU_LORAS="${MAX_CPU_LORAS:-16}"                    # adapters kept loaded in host memory

# Lets the trainer's promotion step load and unload adapters without a restart.
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"

args=(
    --model "$MODEL"
    --served-model-name "$SERVED_NAME"
    --host "$HOST" --port "$PORT"
    --tensor-parallel-size "$TENSOR_PARALLEL_SIZE"
    --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"
    --max-model-len "$MAX_MODEL_LEN"
    --enable-lora
    --max-lora-rank "$MAX_LORA_RANK"
    --max-loras "$MAX_LORAS"
    --max-cpu-loras "$MAX_CPU_LORAS"
)
if [[ -n "${API_KEY:-}" ]]; then
    args+=(--api-key "$API_KEY")   # codeloop sends CODELOOP_BACKEND__API_KEY
fi

exec "$PYTHON" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
