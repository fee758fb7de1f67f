#!/usr/bin/env bash
# Time megakernel launch configs, and optionally whole kernel variants, on a GPU:
#   bash benchmarks/sweep_megakernel.sh OUTDIR JOBS [VARIANT_DIR ...]
# JOBS has one shape per line, "MODEL BATCH CONFIGS [| SHAPES]", e.g.
#   qwen3-8b 1 [{}, {"stages": 4}]
#   qwen3-0.6b 1 [{"block_k_out": 512}] | [{"attn_splits": 8}]
# (SHAPES: DecodeShape fields, each timed with the first config after the configs; bench_megakernel.py --shapes).
# Each VARIANT_DIR's .py files replace their namesakes in vllm_mirage/megakernel/ (kernel.py, gemv_tiles.py,
# ...) in a copy of the tree of its own, named after the directory (without any, the tree as it is).
# Compiling one variant of the kernel takes ~10 s, so first every (kernel, shape, config) is compiled by a
# 1-layer run in parallel processes (Triton's cache is shared); then each shape is timed in one process per
# kernel, the kernels alternating, and OUTDIR gets one JSON and log each.
set -uo pipefail
out=$1 jobs=$2
shift 2
bench=benchmarks/bench_megakernel.py
mkdir -p "$out"
trees=()
if [ $# -eq 0 ]; then
    trees=("$PWD")
else
    for variant in "$@"; do
        tree=$(mktemp -d)/$(basename "$variant")
        mkdir -p "$tree" && cp -r vllm_mirage benchmarks tests "$tree"/ &&
            cp "$variant"/*.py "$tree"/vllm_mirage/megakernel/
        trees+=("$tree")
    done
fi
start=$(date +%s)
split_job() {  # "CONFIGS [| SHAPES]" -> $configs $shapes
    configs=${1%%|*} shapes="[]"
    [ "$configs" = "$1" ] || shapes=${1#*|}
}
while read -r model batch rest; do
    [ -z "$model" ] && continue
    split_job "$rest"
    # One process per distinct config (not in a pipeline: `wait` only sees this shell's children).
    python3 -c 'import json, sys; [print(json.dumps([c])) for c in json.loads(sys.argv[1])]' "$configs" |
        sort -u > "$out/.configs"
    for tree in "${trees[@]}"; do
        while read -r config; do
            (cd "$tree" && python3 $bench --layers 1 --models "$model" --batch-sizes "$batch" --configs "$config" \
                --shapes "$shapes" --out "$(mktemp)" > /dev/null 2>&1) &
        done < "$out/.configs"
    done
done < "$jobs"
wait
rm -f "$out/.configs"
echo "compiled in $(( $(date +%s) - start )) s"
line=0
while read -r model batch rest; do
    [ -z "$model" ] && continue
    split_job "$rest"
    line=$((line + 1))
    for tree in "${trees[@]}"; do
        kernel=$( [ $# -eq 0 ] || echo "$(basename "$tree") ")  # the variant's name, if there are variants
        name=${kernel// /_}${model}_b${batch}_job$line
        (cd "$tree" && python3 $bench --models "$model" --batch-sizes "$batch" --configs "$configs" \
            --shapes "$shapes" --out "$out/$name.json" > "$out/$name.log" 2>&1)
        grep -h "ms/step" "$out/$name.log" | sed "s/^/$kernel/"
    done
done < "$jobs"
echo "done in $(( $(date +%s) - start )) s"
