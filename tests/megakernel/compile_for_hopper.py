"""Compile the persistent decode kernel for sm_90 without a GPU (Triton's ahead-of-time path) and print
what its memory accesses and spin-waits became. Run in a process without TRITON_INTERPRET (the jit
decorator reads it).

    python tests/megakernel/compile_for_hopper.py DTYPE HQ HKV [BATCH [HIDDEN [STAGES [EARLY]]]]

MEGAKERNEL_DUMP=PREFIX also writes PREFIX.ttgir and PREFIX.ptx.

Integer arguments and pointers are marked divisible by 16 where a real launch would find them so (the
JIT specialises on that), so the loads seen here are the ones the GPU runs.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_mirage.megakernel.graph import DecodeShape
from vllm_mirage.megakernel.kernel import LaunchConfig, _decode_step_kernel, launch_constants


def early_weight_copies(ttgir: str) -> int:
    """Asynchronous copies issued just before (in the same block as) an innermost loop that contains a
    spin-wait: the weight chunks a GEMV task requests before it waits for its producers."""
    return sum(early_weight_loops(ttgir))


def early_weight_loops(ttgir: str) -> list[int]:
    """:func:`early_weight_copies`, loop by loop (one entry per loop with at least one)."""
    lines = ttgir.splitlines()
    indent = lambda line: len(line) - len(line.lstrip())  # noqa: E731
    loops = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        depth, end = indent(line), i + 1
        while end < len(lines) and not (indent(lines[end]) <= depth and lines[end].lstrip().startswith("}")):
            end += 1
        body = lines[i + 1:end]
        if any("scf.for" in b for b in body) or not any(_is_poll(b) for b in body):
            continue
        k, count = i - 1, 0
        while k >= 0 and indent(lines[k]) >= depth:
            count += indent(lines[k]) == depth and "async_copy_global_to_local" in lines[k]
            k -= 1
        if count:
            loops.append(count)
    return loops


def _is_poll(line: str) -> bool:
    """An acquire load of a stage counter: Triton's atomic, or every thread's own (LaunchConfig.thread_polls)."""
    return ("atomic_rmw" in line and "acquire" in line) or "ld.global.acquire" in line


def function_ir(ttgir: str, name: str) -> str:
    """The text of the (first) function whose symbol contains ``name``."""
    start = next((m.start() for m in re.finditer(r"tt\.func ", ttgir) if name in ttgir[m.start():m.start() + 300]), -1)
    if start < 0:
        return ""
    end = ttgir.find("tt.func ", start + 1)
    return ttgir[start:end if end > 0 else len(ttgir)]


def register_use(ptx: str) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) as ptxas reports them for sm_90a, without a GPU. The
    kernel sits at the 255-register cap; this is how attention's register use was found to be what it
    runs out on (docs/design.md). Spill bytes alone do not predict step time."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        out = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", str(src), "-o", str(Path(tmp, "k.cubin"))],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    return (int(re.search(r"Used (\d+) registers", log).group(1)),
            int(re.search(r"(\d+) bytes spill stores", log).group(1)))


def main(dtype: str, hq: int, hkv: int, batch: int = 1, hidden: int = 4096, stages: int | None = None,
         early: int | None = None) -> None:
    act = f"*{dtype}"
    ints = ("stride_bt", "H", "I", "V", "NT", "stride_blk", "stride_tok", "stride_head")
    sig = {name: "i32" for name in ints}
    sig.update({name: "*i32" for name in ("queue_offsets", "counters", "block_tables", "first_rows", "arrivals")})
    sig.update({name: "*i64" for name in ("program", "trace", "kvtab", "positions", "slot_mapping", "down_ptrs",
                                          "down_acc")})
    sig.update({name: act for name in ("res", "qkv_buf", "attn_buf", "act_buf", "final_out")})
    sig.update({name: "*fp32" for name in ("sumsq", "cos_sin", "attn_acc", "attn_ml")})
    sig.update(eps="fp32", scale="fp32")
    # QKV rows per task and attention splits as on a 132-SM H100 (48-row QKV tiles at Qwen3-8B's head
    # counts: a non-power-of-two tile).
    shape = DecodeShape(hidden=hidden, intermediate=1 << 16, num_heads=hq, num_kv_heads=hkv, head_dim=128,
                        num_layers=1, vocab=1, batch=batch).for_workers(132)
    config = LaunchConfig(**({} if stages is None else {"stages": stages}),
                          **({} if early is None else {"early_weights": bool(early)}))
    consts, num_warps = launch_constants(shape, config, block_size=16, upcast=False, trace=False)
    sig.update({name: "constexpr" for name in consts})
    names = list(_decode_step_kernel.arg_names)
    # Every pointer (torch allocations) and these sizes and strides are multiples of 16 at Qwen3 shapes.
    aligned = [n for n, t in sig.items() if t.startswith("*")] + ["H", "I", "V", "stride_blk", "stride_tok",
                                                                   "stride_head"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(fn=_decode_step_kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    if os.environ.get("MEGAKERNEL_DUMP"):
        for ext in ("ttgir", "ptx"):
            Path(f"{os.environ['MEGAKERNEL_DUMP']}.{ext}").write_text(compiled.asm[ext])
    loads = re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)
    registers, spill_bytes = register_use(ptx)
    print(json.dumps({
        "registers": registers,
        "spill_store_bytes": spill_bytes,
        "shared_bytes": compiled.metadata.shared,
        "acquire_loads": len(re.findall(r"ld\.global\.(?:gpu\.acquire|acquire\.gpu)", ptx)),
        "release_adds": len(re.findall(r"(?:red|atom)\.global\.gpu\.release\.add", ptx)),
        "attn_splits": shape.attn_splits,
        "arrival_adds": len(re.findall(r"atom\.global\.gpu\.acq_rel\.add", ptx)),
        "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "early_weight_copies": early_weight_copies(compiled.asm["ttgir"]),
        "early_weight_loops": len(early_weight_loops(compiled.asm["ttgir"])),
        "gu_tiles_early_copies": early_weight_copies(function_ir(compiled.asm["ttgir"], "_gemv_tiles")),
        "vector_loads": sum(1 for ld in loads if ".v4" in ld or ".v2" in ld),
        "scalar_16bit_loads": sum(1 for ld in loads if ld.endswith(".b16")),
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:]))
