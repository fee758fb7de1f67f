#!/usr/bin/env bash
# The megakernel's GPU tests, then its benchmark: needs torch + Triton only (no vLLM), about 3 minutes.
#   bash benchmarks/megakernel_device.sh OUTDIR
# 1. correctness with one worker per SM, CUDA-graph capture/replay; 2. step time against the floor.
set -uo pipefail
out=${1:?usage: megakernel_device.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pytest -q -m gpu tests/megakernel -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU tests failed: not timing a wrong kernel"; exit 1; }
python3 benchmarks/bench_megakernel.py --out "$out/megakernel.json" 2>&1 | tee "$out/bench.log"
