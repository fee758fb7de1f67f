"""One megakernel decode step for a profiler: warm up (compile), then run the step once more.

    ncu -k regex:_decode_step_kernel --launch-skip 1 --launch-count 1 --section WarpStateStats \
        python benchmarks/profile_megakernel.py --model qwen3-0.6b --batch 1
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_megakernel import SHAPES, setup_step  # noqa: E402
from tests.megakernel.conftest import random_weights  # noqa: E402
from vllm_mirage.megakernel import kernel  # noqa: E402
from vllm_mirage.megakernel.kernel import LaunchConfig  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="qwen3-0.6b")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--context", type=int, default=128)
ap.add_argument("--config", default="{}", help="LaunchConfig fields as JSON")
args = ap.parse_args()
cfg = SHAPES[args.model]
weights = random_weights(**cfg, dtype=torch.bfloat16, device="cuda")
batch, graph, buffers = setup_step(cfg, weights, args.batch, args.context, lm_head=False)
config = LaunchConfig(**json.loads(args.config))
for _ in range(2):
    kernel.decode_step(graph, weights, batch, buffers, config=config)
torch.cuda.synchronize()
