#!/usr/bin/env bash
# The end-to-end runs behind BENCHMARKS.md, on a CUDA machine where vLLM and this package are installed.
#   bash benchmarks/e2e_device.sh check qwen3-0.6b OUTDIR
#   bash benchmarks/e2e_device.sh bench qwen3-8b OUTDIR
#   MODE=megakernel bash benchmarks/e2e_device.sh check qwen3-0.6b OUTDIR   (the Mirage side's --mode)
#   MODE="fused megakernel" bash benchmarks/e2e_device.sh bench qwen3-8b OUTDIR   (bench: both, one stock)
#   MODE="multi-token multi-token-eagle" TOKENS=4 bash benchmarks/e2e_device.sh bench random:qwen3-0.6b OUTDIR
#     (tokens per step; the self-draft through vLLM's draft_model and EAGLE routes)
#   MODE=multi-token-eagle TOKENS="2 3 4" bash benchmarks/e2e_device.sh bench random:qwen3-0.6b OUTDIR
#     (one side per tokens-per-step count, against the same stock engine)
#   CONTROL='{"max_num_seqs": 8}' bash benchmarks/e2e_device.sh check random:qwen3-8b+layers=8 OUTDIR   (and stock vs stock)
#   STARTS=3 MODE="fused megakernel" BATCHES="1 2 4 8 16 32 64" bash benchmarks/e2e_device.sh bench qwen3-0.6b OUTDIR
#     (engine starts per side: host-bound models vary from one start to the next)
#   STARTS=3 MODE="stock fused megakernel" ... bench ...   (stock: a second stock engine timed like a Mirage side,
#     the yardstick for each point's paired ratio)
# bench keeps every side's engine alive at once and times them in turn (--interleave): on a host-bound model
# one engine's wall step moves by a fifth between timed blocks, and the paired ratios cancel that.
# bench resumes: run the same command again after a stop and it measures only the engine runs still missing.
# Only the batch sizes we report are captured as CUDA graphs (both sides alike): it shortens engine start.
set -uo pipefail
what=$1 model=$2 out=$3
# ENGINE overrides the engine arguments of both sides, e.g. with "max_num_seqs": 16 so that decode
# batches stay within the megakernel's limit (vllm_mirage/megakernel/bridge.py: MAX_BATCH).
engine=${ENGINE:-'{"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]}}'}
read -r -a modes <<< "${MODE:-fused}"
read -r -a tokens <<< "${TOKENS:-}"
mode=(--mode "${modes[@]}")
[ "${#tokens[@]}" -gt 0 ] && mode+=(--tokens-per-step "${tokens[@]}")
baselines=('{}' '{"async_scheduling": true}')
[ -n "${BASELINE:-}" ] && baselines=("$BASELINE")  # one stock setting only
# check and bench sample greedily, which never takes FlashInfer's sampler; left on, each engine's warm-up
# builds its JIT module first (2-3 minutes on a machine without FlashInfer's cache).
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
case "$what" in
    check)
        vllm-mirage check "${mode[@]}" --model "$model" --max-tokens 64 --engine-args "$engine" \
            ${CONTROL:+--control "$CONTROL"} --output "$out" ;;
    bench)
        # Stock twice (default, async scheduling: the faster is "stock"); Mirage with async scheduling.
        vllm-mirage bench "${mode[@]}" --model "$model" --batch-sizes ${BATCHES:-1 8 64} --max-tokens 128 \
            --num-warmup 2 --num-iterations ${ITERS:-5} --starts ${STARTS:-1} --engine-args "$engine" \
            --baseline-args "${baselines[@]}" --mirage-args '{"async_scheduling": true}' \
            --profile-gpu --interleave --resume --output "$out" ;;
esac
