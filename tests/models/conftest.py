from pathlib import Path

import pytest

from vllm_mirage.tiny_model import make_tiny_qwen3

# Qwen3 with a head dim that is not a power of two, and its twin (same seed, same weights) with an
# 8-token sliding window on every layer: shorter than the prompts plus their continuations.
HEAD_DIM_96 = dict(head_dim=96)
SLIDING_WINDOW = dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)


@pytest.fixture(scope="session")
def tiny_qwen3_head_dim_96(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-d96"), **HEAD_DIM_96)


@pytest.fixture(scope="session")
def tiny_qwen3_sliding_window(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3-d96-window"), **HEAD_DIM_96, **SLIDING_WINDOW)
