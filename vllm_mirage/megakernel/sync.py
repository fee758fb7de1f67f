"""The device side of the megakernel's synchronisation protocol (docs/design.md): a worker reads its
encoded queue one task ahead, and a task spins on the counter of the stage it depends on with acquire
loads before it reads what that stage wrote. The release that ends a task is the kernel's own."""

import triton
import triton.language as tl


@triton.jit
def _address(value, ptr_type: tl.constexpr):
    """A pointer from an encoded address. Weight slices start 16-byte aligned (checked by
    :func:`~vllm_mirage.megakernel.kernel.encode_program`); saying so is what lets loads through them be
    16-byte vectors."""
    return tl.multiple_of(value.to(ptr_type), 16)


@triton.jit
def _read_task(program, qi, end):
    """Entry ``qi`` of a worker's encoded queue (:func:`~vllm_mirage.megakernel.kernel.encode_program`):
    kind, layer, index, wait stage, wait count, signal stage, weight address, aux address. Past ``end``:
    kind -1, nothing to run."""
    row = program + qi * 8
    ok = qi < end
    return (tl.load(row, mask=ok, other=-1), tl.load(row + 1, mask=ok, other=0), tl.load(row + 2, mask=ok, other=0),
            tl.load(row + 3, mask=ok, other=-1), tl.load(row + 4, mask=ok, other=0), tl.load(row + 5, mask=ok, other=0),
            tl.load(row + 6, mask=ok, other=0), tl.load(row + 7, mask=ok, other=0))


@triton.jit
def _poll(counter, POLLS: tl.constexpr):
    """The counter's value, loaded with acquire semantics. Triton's scalar atomic has one thread load it
    and hand it to the others through shared memory, behind a CTA barrier, so every thread's later
    loads are ordered after the acquire. POLLS: every thread loads it itself (inline PTX, so not in
    Triton's interpreter), no hand-over."""
    if POLLS:
        seen = tl.inline_asm_elementwise("ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [counter],
                                         dtype=tl.int32, is_pure=False, pack=1)
    else:
        seen = tl.atomic_add(counter, 0, sem="acquire")
    return seen


@triton.jit
def _wait(counters, stage, count, trace_row, TRACE: tl.constexpr, BARRIER: tl.constexpr = True,
          POLLS: tl.constexpr = False):
    """Spin until ``stage`` has signalled ``count`` tasks (acquire, ``_poll``); stage < 0: no wait.
    Returns the count seen (≥ 0), which callers put in the masks of the loads that must not start before
    it. With TRACE, the time the wait ended goes to ``trace_row[1]``.

    BARRIER adds a CTA barrier after the loop; inside a loop Triton is to pipeline, leave it out: any
    barrier in a loop stops Triton's pipeliner (seen in the sm_90 compile)."""
    seen = tl.full([], 0, tl.int32)
    if stage >= 0:
        seen = _poll(counters + stage, POLLS)
        while seen < count:
            seen = _poll(counters + stage, POLLS)
    if BARRIER:
        tl.debug_barrier()
    if TRACE:
        tl.store(trace_row + 1, tl.extra.cuda.globaltimer())
    return seen
