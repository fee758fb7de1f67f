#!/usr/bin/env bash
# The end-to-end runs behind BENCHMARKS.md, on a CUDA machine where vLLM and this package are installed.
#   bash benchmarks/e2e_device.sh check qwen3-0.6b OUTDIR
#   bash benchmarks/e2e_device.sh bench qwen3-8b OUTDIR
# Only the batch sizes we report are captured as CUDA graphs (both sides alike): it shortens engine start.
set -uo pipefail
what=$1 model=$2 out=$3
engine='{"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}}'
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
case "$what" in
    check)
        vllm-mirage check --model "$model" --max-tokens 64 --engine-args "$engine" --output "$out" ;;
    bench)
        # Stock twice (default, async scheduling: the faster is "stock"); Mirage with async scheduling.
        vllm-mirage bench --model "$model" --batch-sizes 1 8 64 --max-tokens 128 \
            --num-warmup 2 --num-iterations 5 --engine-args "$engine" \
            --baseline-args '{}' '{"async_scheduling": true}' --mirage-args '{"async_scheduling": true}' \
            --profile-gpu --output "$out" ;;
esac
