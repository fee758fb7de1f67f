#!/usr/bin/env bash
# Measure what a GPU's decode plan needs, on a CUDA machine with vLLM and this package installed:
#   bash benchmarks/plan_device.sh tune TABLE.json                 kernel paths of the Qwen3 presets (vllm-mirage tune)
#   bash benchmarks/plan_device.sh paths MODEL TABLE.json OUT      each Mirage path forced at batch 1-16 against stock
# "paths" runs the fused layers and the megakernel at every batch size (the table's kernel paths, both limits
# raised to 16), so that the table's fused_max_tokens and megakernel_max_batch can be set to where each beat
# stock; cite the resulting results.json in the entry's notes. BATCHES, ITERS and STARTS override the defaults.
set -euo pipefail
what=$1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
case "$what" in
    tune)
        vllm-mirage tune --output "$2" ;;
    paths)
        model=$2 table=$3 out=$4
        plan=$(mktemp --suffix .json)
        python3 - "$model" "$table" "$plan" <<'PY'
import json, sys
from vllm_mirage.cli.tune import preset_shape
model, table, plan = sys.argv[1:]
entry = json.load(open(table))["shapes"][preset_shape(model).key()]
json.dump({**entry, "fused_max_tokens": 16, "megakernel_max_batch": 16}, open(plan, "w"))
PY
        VLLM_MIRAGE_PLAN=$plan vllm-mirage bench --mode fused megakernel --model "$model" \
            --batch-sizes ${BATCHES:-1 2 4 8 16} --max-tokens 128 --num-warmup 2 --num-iterations ${ITERS:-5} \
            --starts ${STARTS:-1} \
            --engine-args '{"max_num_seqs": 16, "compilation_config": {"cudagraph_capture_sizes": [1, 2, 4, 8, 16]}}' \
            --baseline-args '{"async_scheduling": true}' --mirage-args '{"async_scheduling": true}' \
            --profile-gpu --output "$out" ;;
    *)
        echo "usage: plan_device.sh tune TABLE.json | paths MODEL TABLE.json OUT" >&2
        exit 2 ;;
esac
