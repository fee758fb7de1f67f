"""``vllm-mirage``: check that Mirage keeps vLLM's tokens, and measure how much faster it is.

    vllm-mirage check --model qwen3-0.6b          # same greedy tokens as stock vLLM?
    vllm-mirage bench --model qwen3-8b --batch-sizes 1 8 64 --output out/

Exit codes: 0 success; 1 check found a real token mismatch; 2 usage error (bad argument, missing or
empty prompts file, unknown model); 3 Mirage did not apply because the model is not Qwen3;
4 Mirage was requested on a Qwen3 model but did not apply (with --mode megakernel: or no decode step went
through the megakernel); 5 the engine failed (e.g. out of memory).
"""

from __future__ import annotations

import argparse
import signal
import sys

from vllm_mirage.cli.check import DEFAULT_TOLERANCE, TOP_LOGPROBS
from vllm_mirage.cli.context import DEFAULT_TOKENS_PER_STEP
from vllm_mirage.cli.errors import CliError
from vllm_mirage.cli.models import PRESETS

_MODEL_HELP = (
    "a local checkpoint directory, a Hugging Face id (needs the hub), or a preset: "
    f"{', '.join(PRESETS)} (Qwen3 shapes with random weights; 'tiny' is a small real checkpoint), or "
    "random:<preset>[+layers=N][+sliding[=W]] (the shapes saved with scaled random weights and a tokenizer, "
    "logits far from uniform; +layers: N layers of the preset's shapes; +sliding: a W-token attention window, "
    "default 128). "
    "Default: qwen3-0.6b with a CUDA GPU, tiny without"
)


MODES = ["fused", "megakernel", "multi-token", "multi-token-eagle"]
_MODE_HELP = ("the Mirage side's path: fused layers (VLLM_USE_MIRAGE=1), fused layers plus megakernel decode "
              "steps (VLLM_USE_MIRAGE=megakernel), or multi-token: megakernel mode with the model as its own "
              "draft model, so each engine step yields up to --tokens-per-step tokens (multi-token-eagle: "
              "the same draft through vLLM's EAGLE speculator, exact: it reads the target's KV cache)")

_TOKENS_HELP = ("--mode multi-token(-eagle): tokens per engine step at most, N-1 of them drafted by the megakernel "
                f"(vLLM's num_speculative_tokens = N-1; default {DEFAULT_TOKENS_PER_STEP})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-mirage", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{check,bench,tune}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help=_MODEL_HELP)
    common.add_argument("--prompts", metavar="FILE",
                        help="one prompt per line; '#' comments and empty lines skipped; \\n in a line is a "
                             "newline (default: the bundled test_prompts.txt)")
    common.add_argument("--max-tokens", type=int, metavar="N", help="tokens generated per prompt")
    common.add_argument("--dtype", help="model dtype passed to vLLM (default: auto; float32 for tiny, "
                                        "where check then compares exactly)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--max-model-len", type=int, metavar="N", help="default 2048 on GPU, 512 on CPU")
    common.add_argument("--gpu-memory-utilization", type=float, default=0.85, metavar="F",
                        help="fraction of GPU memory vLLM may use (CUDA only; default 0.85)")
    common.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile")
    common.add_argument("--compile", action="store_true",
                        help="on CPU, use vLLM's default compilation instead of eager mode")
    common.add_argument("--engine-args", metavar="JSON", help="extra vLLM engine arguments for both sides")
    common.add_argument("--cache-dir", metavar="DIR",
                        help="where presets are written (default: $VLLM_MIRAGE_CACHE or ~/.cache/vllm-mirage)")
    common.add_argument("--verbose", action="store_true", help="show engine output instead of logging it")

    check = sub.add_parser("check", parents=[common], help="compare greedy tokens of stock vLLM and Mirage",
                           description="Run stock vLLM and vLLM with Mirage on the same prompts "
                                       "(greedy, ignore_eos) and compare token ids and logprobs.")
    check.add_argument("--mode", choices=[*MODES, "stock"], default="fused",
                       help=_MODE_HELP + "; or stock, a control: both sides run stock vLLM, so the comparison "
                                         "shows what --mirage-args alone change (e.g. another max_num_seqs)")
    check.add_argument("--tokens-per-step", type=int, default=DEFAULT_TOKENS_PER_STEP, metavar="N",
                       help=_TOKENS_HELP)
    check.add_argument("--logprobs", type=int, metavar="K",
                       help=f"compare the logprobs of stock's top K tokens at each step (default {TOP_LOGPROBS})")
    check.add_argument("--skip-baseline", action="store_true", help="only run the Mirage side (smoke test)")
    check.add_argument("--tolerance", type=float, metavar="NATS",
                       help="16-bit dtypes: a divergence where Mirage's token is at most this far below the "
                            "stock top-1 (in stock logprobs) is a tolerated near-tie (default: "
                            + ", ".join(f"{v} for {k}" for k, v in DEFAULT_TOLERANCE.items())
                            + "); float32 is compared exactly")
    check.add_argument("--output", metavar="DIR", help="write check.json and the engine logs here")
    check.add_argument("--baseline-args", metavar="JSON",
                       help="engine arguments for the stock side only, e.g. "
                            "'{\"tensor_parallel_size\": 1}' to hold Mirage at TP=2 against stock at TP=1")
    check.add_argument("--mirage-args", metavar="JSON", help="engine arguments for the Mirage side only")
    check.add_argument("--control", metavar="JSON",
                       help="also run stock with these engine arguments (e.g. '{\"max_num_seqs\": 8}': other "
                            "batches) and report it against stock beside Mirage: the differences rounding alone "
                            "makes on this model")
    check.set_defaults(func="check")

    bench = sub.add_parser("bench", parents=[common], help="measure stock vLLM and Mirage speed",
                           description="Time stock vLLM and vLLM with Mirage, each in its own fresh process.")
    bench.add_argument("--mode", choices=[*MODES, "stock"], nargs="+", default=["fused"],
                       help=_MODE_HELP + "; several, e.g. 'fused megakernel', run one Mirage side each against "
                                         "the same stock runs; stock, a control: one more stock engine timed "
                                         "like a Mirage side (with --interleave, how far two stock engines "
                                         "pair at each point)")
    bench.add_argument("--tokens-per-step", type=int, nargs="+", default=[DEFAULT_TOKENS_PER_STEP], metavar="N",
                       help=_TOKENS_HELP + "; several run one side per N for each multi-token --mode, against the "
                                           "same stock runs (to choose N)")
    bench.add_argument("--batch-sizes", type=int, nargs="+", metavar="B", help="default 1 8 64 on GPU, 1 4 on CPU")
    bench.add_argument("--num-warmup", type=int, metavar="W", help="warm-up iterations per batch size")
    bench.add_argument("--num-iterations", type=int, metavar="K", help="timed iterations per batch size")
    bench.add_argument("--starts", type=int, default=1, metavar="S",
                       help="engine starts per side, interleaved (stock, Mirage, stock, ...); medians pool the "
                            "iterations of all starts. Use >= 3 where the wall step is host-bound (default 1)")
    bench.add_argument("--interleave", action="store_true",
                       help="keep every side's engine alive at once (each in its own process) and time one "
                            "iteration of each in turn, so a slow spell of the host lands on all sides; reports "
                            "the median of the paired ratios beside the medians. GPU memory is split between them")
    bench.add_argument("--output", metavar="DIR",
                       help="results.json, report.md, plot.png and logs (default: ./vllm-mirage-bench-<time>)")
    bench.add_argument("--resume", action="store_true",
                       help="reuse the engine runs a stopped bench saved in --output (DIR/runs) where the model, "
                            "settings, package source, versions and GPU are the same; run only the others")
    bench.add_argument("--baseline-args", nargs="+", metavar="JSON",
                       help="engine arguments for the stock side only; several give several baselines and "
                            "the fastest is reported as stock, e.g. '{}' '{\"async_scheduling\": true}'")
    bench.add_argument("--mirage-args", metavar="JSON", help="engine arguments for the Mirage side only")
    bench.add_argument("--profile-gpu", action="store_true",
                       help="also measure GPU kernel time per decode step (torch profiler; CUDA only)")
    bench.set_defaults(func="bench")

    tune = sub.add_parser("tune", help="measure which kernel path wins per op and batch on this GPU",
                          description="Time the fused kernels against norm kernel + cuBLAS on Qwen3 shapes on "
                                      "this GPU, as an engine does at its first start on a GPU without a "
                                      "shipped table; cache the result, or write a table with --output.")
    tune.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"],
                      choices=[p for p in PRESETS if p != "tiny"], metavar="PRESET")
    tune.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N")
    tune.add_argument("--output", metavar="FILE", help="write (merge into) a per-GPU table instead of the cache")
    tune.set_defaults(func="tune")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A timeout's SIGTERM unwinds like Ctrl-C, so the engine being run is stopped with this process.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _check_switch()
        if args.func == "check":
            from vllm_mirage.cli.check import run_check

            return run_check(args)
        if args.func == "tune":
            from vllm_mirage.cli.tune import run_tune

            return run_tune(args)
        from vllm_mirage.cli.bench import run_bench

        return run_bench(args)
    except CliError as e:
        if e.details:
            print(e.details, file=sys.stderr)
        print(f"vllm-mirage: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vllm-mirage: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _check_switch() -> None:
    # The CLI sets VLLM_USE_MIRAGE for each side itself, but an invalid value in the caller's
    # environment means someone expected it to do something: say so rather than ignore it.
    from vllm_mirage.switch import mirage_mode

    try:
        mirage_mode()
    except ValueError as e:
        raise CliError(f"{e} (vllm-mirage sets it for each side itself; unset it)") from None


if __name__ == "__main__":
    sys.exit(main())
