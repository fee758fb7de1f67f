import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_mirage.tiny_model import make_tiny_qwen3

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "你好，世界",
    "Memory bandwidth, not arithmetic,",
    "SELECT name, count(*) FROM",
    "Once upon a time there was",
]

_JOB = Path(__file__).parent / "models" / "engine_job.py"


# Under pytest-xdist (run.sh test: one worker per core) every engine would bind its OpenMP threads to all
# cores, and each parallel region would wait for a core the other worker's engine holds. The tiny
# models need no more than one thread.
_ONE_THREAD_PER_WORKER = ({"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
                          if os.environ.get("PYTEST_XDIST_WORKER") else {})
if _ONE_THREAD_PER_WORKER:
    torch.set_num_threads(1)


def subprocess_env(**overrides: str) -> dict:
    """The environment for the vLLM and CLI processes tests start: this one's, plus ``overrides``, minus
    Triton's interpreter switch, which tests/ops/conftest.py sets for this whole process (Triton needs it
    at import and at run time). Inherited, it would make those processes run every kernel interpreted;
    a test that wants that passes it in ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(_ONE_THREAD_PER_WORKER)
    env.update(overrides)
    return env


@pytest.fixture(scope="package")
def tiny_qwen3(tmp_path_factory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="package")
def run_engine(tmp_path_factory):
    """Run one engine in a fresh process and return its JSON result.

    ``env`` overrides the environment (e.g. ``VLLM_USE_MIRAGE``); in-process mode and a small KV
    cache keep each run to ~15 s on a 2-core CI machine. Results are cached per arguments.
    """
    cache: dict[str, dict] = {}

    def run(spec: dict, env: dict | None = None, check: bool = True):
        key = json.dumps([spec, env], sort_keys=True)
        if key in cache:
            return cache[key]
        work = tmp_path_factory.mktemp("engine")
        (work / "spec.json").write_text(json.dumps(spec))
        full_env = subprocess_env(
            **{
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                # A fresh compile cache per run unless the test passes one: no test depends on another.
                "VLLM_CACHE_ROOT": str(work / "cache"),
                # vLLM's log lines (this package's included) on stderr, where the tests read them.
                "VLLM_LOGGING_STREAM": "ext://sys.stderr",
                **(env or {}),
            }
        )
        proc = subprocess.run(
            [sys.executable, str(_JOB), str(work / "spec.json"), str(work / "out.json")],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if not check:
            return proc
        if proc.returncode != 0:
            raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        result = json.loads((work / "out.json").read_text())
        result["stderr"] = proc.stderr
        # This package's messages, without vLLM's line prefix (or a progress bar the line was appended to).
        result["mirage_log"] = [line[line.index("vllm-mirage:"):] for line in proc.stderr.splitlines()
                                if "vllm-mirage:" in line]
        cache[key] = result
        return result

    return run


@pytest.fixture(scope="package")
def tiny_llama(tmp_path_factory) -> Path:
    """A non-Qwen3 architecture, to show the plugin leaves other models alone."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, initializer_range=0.1,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    make_tiny_qwen3(path / "tok")  # borrow its tokenizer files
    for f in (path / "tok").glob("tok*"):
        f.rename(path / f.name)
    return path
