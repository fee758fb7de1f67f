#!/usr/bin/env bash
# Tensor parallelism on a machine with 2 GPUs where vLLM and this package are installed.
#   bash benchmarks/tp_device.sh check OUTDIR   # Mirage at TP=2 against stock at TP=1: same tokens?
#   bash benchmarks/tp_device.sh bench OUTDIR   # stock vs Mirage, both at TP=2, Qwen3-8B shapes
#   (BATCHES="1 8" ITERS=3 shorten the bench)
# The token check needs real weights: vLLM's dummy loader fills every rank's shard from the same seed,
# so a dummy model at TP=2 is a different model from the dummy at TP=1. It writes a random checkpoint
# of Qwen3-0.6B's shapes instead: layer std scaled to the width so continuations vary, and embeddings
# large enough that logits spread over several nats (flat logits made every choice a bf16 near-tie).
set -uo pipefail
what=$1 out=$2
ckpt=/tmp/qwen3-0.6b-random-peaked
# On GPUs without NVLink multicast, vLLM 0.26 still fuses all-reduce+RMSNorm
# through FlashInfer's "mnnvl" backend, which needs multicast: the first forward dies with an illegal
# memory access, stock vLLM alike. So both sides run without that fusion and without symmetric memory.
capture='"compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64], "pass_config": {"fuse_allreduce_rms": false}}'
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
case "$what" in
    check)
        [ -f "$ckpt/model.safetensors" ] || python3 -c "
from vllm_mirage.cli.models import qwen3_preset_config
from vllm_mirage.tiny_model import make_tiny_qwen3
c = qwen3_preset_config('qwen3-0.6b')
keys = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
        'num_key_value_heads', 'head_dim', 'vocab_size', 'max_position_embeddings', 'rope_theta',
        'tie_word_embeddings')
make_tiny_qwen3('$ckpt', with_tokenizer=False, std=0.15 * (128 / 1024) ** 0.5, embed_std=0.3, **{k: c[k] for k in keys})
" || exit 1
        vllm-mirage check --model "$ckpt" --dtype bfloat16 --max-tokens 64 \
            --engine-args "{$capture, \"tensor_parallel_size\": 2}" \
            --baseline-args '{"tensor_parallel_size": 1}' --output "$out" ;;
    bench)
        vllm-mirage bench --model qwen3-8b --batch-sizes ${BATCHES:-1 8 64} --max-tokens 128 \
            --num-warmup 2 --num-iterations ${ITERS:-5} \
            --engine-args "{$capture, \"tensor_parallel_size\": 2, \"async_scheduling\": true}" \
            --profile-gpu --output "$out" ;;
esac
