"""Compile the persistent decode kernel for sm_90 without a GPU (Triton's ahead-of-time path) and print
what the spin-waits became. Run in a process without TRITON_INTERPRET (the jit decorator reads it).

    python tests/megakernel/compile_for_hopper.py DTYPE HQ HKV
"""

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_mirage.megakernel.kernel import _decode_step_kernel


def main(dtype: str, hq: int, hkv: int) -> None:
    act = f"*{dtype}"
    ints = ("stride_bt", "B", "H", "I", "V", "SO", "SD", "stride_blk", "stride_tok", "stride_head")
    sig = {name: "i32" for name in ints}
    sig.update({name: "*i32" for name in ("tasks", "queue", "queue_offsets", "counters", "block_tables")})
    sig.update({name: "*i64" for name in ("wtab", "kvtab", "positions", "slot_mapping")})
    sig.update({name: act for name in ("final_norm", "lm_head", "x_buf", "res_mlp", "res_attn", "qkv_buf",
                                      "attn_buf", "o_buf", "act_buf", "final_out")})
    sig.update(cos_sin="*fp32", eps="fp32", scale="fp32")
    consts = dict(HQ=hq, HKV=hkv, D=128, BLOCK_S=16, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)),
                  BLOCK_T=16, BLOCK_N=32, BLOCK_N_LM=128, BLOCK_K=128, UPCAST=False)
    sig.update({name: "constexpr" for name in consts})
    compiled = triton.compile(ASTSource(fn=_decode_step_kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    print(json.dumps({
        "shared_bytes": compiled.metadata.shared,
        "acquire_loads": len(re.findall(r"ld\.global\.gpu\.acquire", ptx)),
        "release_adds": len(re.findall(r"(?:red|atom)\.global\.gpu\.release\.add", ptx)),
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
    }))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
