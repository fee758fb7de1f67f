"""Compile the persistent decode kernel for sm_90 without a GPU (Triton's ahead-of-time path) and print
what its memory accesses and spin-waits became. Run in a process without TRITON_INTERPRET (the jit
decorator reads it).

    python tests/megakernel/compile_for_hopper.py DTYPE HQ HKV [BATCH]

Integer arguments and pointers are marked divisible by 16 where a real launch would find them so (the
JIT specialises on that), so the loads seen here are the ones the GPU runs.
"""

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_mirage.megakernel.kernel import _decode_step_kernel


def main(dtype: str, hq: int, hkv: int, batch: int = 1) -> None:
    act = f"*{dtype}"
    ints = ("stride_bt", "B", "H", "I", "V", "NT", "stride_blk", "stride_tok", "stride_head")
    sig = {name: "i32" for name in ints}
    sig.update({name: "*i32" for name in ("queue_offsets", "counters", "block_tables")})
    sig.update({name: "*i64" for name in ("program", "trace", "kvtab", "positions", "slot_mapping")})
    sig.update({name: act for name in ("res", "qkv_buf", "attn_buf", "act_buf", "final_out")})
    sig.update(sumsq="*fp32", cos_sin="*fp32", eps="fp32", scale="fp32")
    consts = dict(HQ=hq, HKV=hkv, D=128, PAGE=16, BLOCK_S=64, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)),
                  BLOCK_T=min(64, max(16, triton.next_power_of_2(batch))), BLOCK_N=32, BLOCK_N_OUT=32,
                  BLOCK_N_LM=64, BLOCK_K=128, BLOCK_K_OUT=256, BLOCK_H=1024, NT_P2=128, STAGES=4, UPCAST=False, TRACE=False)
    sig.update({name: "constexpr" for name in consts})
    names = list(_decode_step_kernel.arg_names)
    # Every pointer (torch allocations) and these sizes and strides are multiples of 16 at Qwen3 shapes;
    # B is not, unless it is.
    aligned = [n for n, t in sig.items() if t.startswith("*")] + ["H", "I", "V", "stride_blk", "stride_tok",
                                                                   "stride_head"]
    if batch % 16 == 0:
        aligned.append("B")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(fn=_decode_step_kernel, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    loads = re.findall(r"ld\.global(?:\.[a-z0-9]+)*", ptx)
    print(json.dumps({
        "shared_bytes": compiled.metadata.shared,
        "acquire_loads": len(re.findall(r"ld\.global\.gpu\.acquire", ptx)),
        "release_adds": len(re.findall(r"(?:red|atom)\.global\.gpu\.release\.add", ptx)),
        "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)),
        "vector_loads": sum(1 for ld in loads if ".v4" in ld or ".v2" in ld),
        "scalar_16bit_loads": sum(1 for ld in loads if ld.endswith(".b16")),
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:]))
