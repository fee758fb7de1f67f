"""``bench --interleave``: every side's engine alive at once, each in its own process, timed in turn.

On a host-bound model one engine's wall time per decode step moves by a fifth from one timed block to the
next (docs/design.md, "Where a small model's step goes"): sides timed one after another see different
spells of the host. Here the parent asks each engine for one timed pair at a time, rotating which side goes
first, so neighbouring pairs of different sides share a spell and their ratio cancels it
(``stats.paired_ratios``). Engines start one at a time, each sizing its memory while the others already
hold theirs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from vllm_mirage.cli.launch import RunnerProcess, SideRun


def run_interleaved(runs: list[SideRun], workdir: Path, log_dir: Path, on_cuda: bool, verbose: bool,
                    batch_sizes: list[int], num_warmup: int, num_iterations: int) -> list[dict]:
    """Start every run's engine, then per batch size: each side's warm-ups, then ``num_iterations``
    rounds of one timed pair per side; profiled passes last, where they cannot touch a timed pair."""
    per_side = len(batch_sizes) * (bool(num_warmup) + num_iterations + 1) + 1
    bar = tqdm(total=per_side * len(runs), desc="interleaved", unit="step", file=sys.stderr, leave=True)
    engines: list[RunnerProcess] = []
    try:
        for run in runs:
            engines.append(RunnerProcess(run, workdir, log_dir, on_cuda, verbose, commands=True))
            bar.set_postfix_str(f"{run.label}: {engines[-1].next_step()}")
            bar.update(1)

        def each(order, op, batch_size):
            for engine in order:
                bar.set_postfix_str(f"{engine.run.label}: {engine.command(op, batch_size)}", refresh=False)
                bar.update(1)

        for batch_size in batch_sizes:
            if num_warmup:
                each(engines, "warmup", batch_size)
            for i in range(num_iterations):
                k = i % len(engines)
                each(engines[k:] + engines[:k], "pair", batch_size)
        for batch_size in batch_sizes:
            each(engines, "profile", batch_size)
        results = [engine.finish() for engine in engines]
    except BaseException:
        for engine in engines:
            engine.kill()
        raise
    finally:
        bar.close()
    for result in results:
        result["interleaved_with"] = [run.label for run in runs]
    return results
