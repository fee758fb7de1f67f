import gzip
import json

from vllm_mirage.cli.launch import side_env
from vllm_mirage.cli.main import build_parser
from vllm_mirage.cli import context
from vllm_mirage.cli.runner import busiest_gpu_kernel_seconds


def test_side_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")  # a user's own setting wins over our default
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    stock = side_env("stock", tmp_path / "cache", on_cuda=False)
    mirage = side_env("mirage", tmp_path / "cache", on_cuda=False, mirage_switch="megakernel")
    assert (stock["VLLM_USE_MIRAGE"], mirage["VLLM_USE_MIRAGE"]) == ("0", "megakernel")
    assert stock["VLLM_CACHE_ROOT"] == mirage["VLLM_CACHE_ROOT"] == str(tmp_path / "cache")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "mine"))  # a user's own root is kept
    assert side_env("mirage", tmp_path / "cache", on_cuda=True)["VLLM_CACHE_ROOT"] == str(tmp_path / "mine")
    assert stock["VLLM_CPU_KVCACHE_SPACE"] == "3" and stock["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    gpu = side_env("mirage", tmp_path / "c", on_cuda=True)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in gpu  # benchmark the engine as users run it


def test_cpu_defaults(cli_cache, monkeypatch):
    monkeypatch.setattr(context, "has_cuda_gpu", lambda: False)
    args = build_parser().parse_args(["bench", "--cache-dir", str(cli_cache)])
    ctx = context.prepare(args, "bench")
    assert ctx.model.kind == "tiny" and ctx.max_tokens == context.CPU_DEFAULTS["bench_max_tokens"]
    e = ctx.engine_args
    assert e["dtype"] == "float32" and e["enforce_eager"] and "gpu_memory_utilization" not in e
    assert any("no CUDA GPU" in n for n in ctx.notes)


def test_gpu_defaults_for_a_preset(tmp_path, monkeypatch):
    monkeypatch.setattr(context, "has_cuda_gpu", lambda: True)
    args = build_parser().parse_args(["check", "--cache-dir", str(tmp_path), "--engine-args", '{"max_num_seqs": 8}'])
    ctx = context.prepare(args, "check")
    e = ctx.engine_args
    assert ctx.model.model.endswith("qwen3-0.6b") and e["load_format"] == "dummy" and e["skip_tokenizer_init"]
    assert (e["max_model_len"], e["gpu_memory_utilization"], e["enforce_eager"], e["dtype"]) == (2048, 0.85, False, "auto")
    assert e["max_num_seqs"] == 8
    assert any("byte fallback" in n for n in ctx.notes)


def test_busiest_gpu_kernel_seconds(tmp_path):
    events = [
        {"cat": "kernel", "name": "fused_rms_norm_qkv", "dur": 12.5},
        {"cat": "kernel", "name": "flash_attn", "dur": 7.5},
        {"cat": "cpu_op", "name": "aten::mm", "dur": 1000},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 100},
    ]
    rank0 = tmp_path / "rank0.pt.trace.json"
    rank0.write_text(json.dumps({"traceEvents": events}))
    rank1 = tmp_path / "rank1.pt.trace.json.gz"
    with gzip.open(rank1, "wt") as f:
        json.dump({"traceEvents": events[:1]}, f)
    # Kernels only (no CPU ops or copies); two tensor-parallel ranks run in parallel: the busier one counts.
    assert busiest_gpu_kernel_seconds([rank1, rank0]) * 1e6 == 20.0
    assert busiest_gpu_kernel_seconds([rank1]) * 1e6 == 12.5


def test_a_stopped_side_takes_its_engine_processes_with_it():
    """The runner starts vLLM's engine processes; stopping a command (Ctrl-C, a timeout) must not leave them
    holding the GPU. The runner's group is killed whole: here a shell and the sleeper it started."""
    import os
    import subprocess
    import time

    from vllm_mirage.cli.launch import _kill_group

    proc = subprocess.Popen(["bash", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(proc.stdout.readline())
    _kill_group(proc)
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} outlived its group")
