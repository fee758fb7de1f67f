"""CUDA timing shared by the first-use tuner and ``benchmarks/bench_ops.py`` (METHOD: graphs, medians,
weights rotated past the L2 so HBM, not cache, is measured)."""

import torch
import triton

# Larger than the L2 of any GPU we measured (H100 and H200: 50 MB), so rotated weight copies come from HBM.
L2_BYTES = 50 * 2**20


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so that each call reads HBM, not the L2."""
    return max(2, -(-4 * L2_BYTES // nbytes))


def graph_time_us(fn, n_calls: int, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of one call: ``fn(i)`` for i in range(n_calls) captured in a graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(n_calls):  # warm-up: compile kernels, settle allocator
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            fn(i)
    ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return ms * 1e3 / n_calls


def copy_bandwidth(dtype: torch.dtype = torch.bfloat16) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(256 * 2**20, device="cuda", dtype=dtype)  # 512 MB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)
