"""What both subcommands share: the device, the model, the prompts and the engine arguments."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mirage.cli.errors import CliError
from vllm_mirage.cli.launch import has_cuda_gpu
from vllm_mirage.cli.models import ResolvedModel, resolve_model
from vllm_mirage.cli.prompts import default_prompts_path, load_prompts

# Defaults that fit a 16 GB GPU, and a 2-core CPU machine without one.
CUDA_DEFAULTS = dict(model="qwen3-0.6b", max_model_len=2048, check_max_tokens=32, bench_max_tokens=128,
                     batch_sizes=[1, 8, 64], num_warmup=2, num_iterations=5)
CPU_DEFAULTS = dict(model="tiny", max_model_len=512, check_max_tokens=16, bench_max_tokens=16,
                    batch_sizes=[1, 4], num_warmup=1, num_iterations=2)
DEFAULT_TOKENS_PER_STEP = 4


@dataclass
class Context:
    on_cuda: bool
    model: ResolvedModel
    prompts: list[str]
    prompts_file: str
    max_tokens: int
    engine_args: dict  # for both sides; per-side extras are added by the subcommand
    tokens_per_step: int = DEFAULT_TOKENS_PER_STEP  # --mode multi-token's
    # --mode: the Mirage side's path, "fused" or "megakernel"; bench takes several, one Mirage side each.
    modes: list[str] = field(default_factory=lambda: ["fused"])
    notes: list[str] = field(default_factory=list)  # shown in the output and the report

    @property
    def mode(self) -> str:
        """The Mirage side's path (check's only one, bench's first)."""
        return self.modes[0]

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", file=sys.stderr)


def switch_for(mode: str) -> str:
    """VLLM_USE_MIRAGE for a Mirage side run in ``mode`` ("stock": check's control run)."""
    return {"megakernel": "megakernel", "multi-token": "megakernel", "multi-token-eagle": "megakernel",
            "stock": "0"}.get(mode, "1")


MULTI_TOKEN_MODES = ("multi-token", "multi-token-eagle")


def mode_engine_args(mode: str, model: str, tokens_per_step: int) -> dict:
    """Engine arguments a mode needs. multi-token is vLLM's draft-model speculative decoding with the model
    as its own draft: the Mirage draft model's decode steps take the megakernel where the plan says, the
    target's verify pass (stock's forward) decides every token, and vLLM's scheduler, rejection sampler and
    stop checks stay in charge. multi-token-eagle drafts with the same model through vLLM's EAGLE speculator
    (``models/self_draft.py``: over the target's KV cache, one position ahead of EAGLE's inputs)."""
    method = {"multi-token": "draft_model", "multi-token-eagle": "eagle"}.get(mode)
    if method is None:
        return {}
    return {"speculative_config": {"method": method, "model": model, "num_speculative_tokens": tokens_per_step - 1}}


def defaults(on_cuda: bool) -> dict:
    return CUDA_DEFAULTS if on_cuda else CPU_DEFAULTS


def prepare(args, command: str) -> Context:
    on_cuda = has_cuda_gpu()
    d = defaults(on_cuda)
    prompts_file = Path(args.prompts) if args.prompts else default_prompts_path()
    prompts = load_prompts(prompts_file)
    model = resolve_model(args.model or d["model"], args.cache_dir)
    max_tokens = d[f"{command}_max_tokens"] if args.max_tokens is None else args.max_tokens
    if max_tokens < 1:
        raise CliError("--max-tokens must be at least 1")
    modes = [args.mode] if isinstance(args.mode, str) else list(dict.fromkeys(args.mode))
    counts = args.tokens_per_step if isinstance(args.tokens_per_step, list) else [args.tokens_per_step]
    if min(counts) < 2:
        raise CliError("--tokens-per-step must be at least 2 (one verified token plus at least one draft)")
    ctx = Context(on_cuda, model, prompts, str(prompts_file), max_tokens, engine_args={}, modes=modes,
                  tokens_per_step=counts[0])
    if not on_cuda:
        ctx.note("no CUDA GPU found: running on CPU (small defaults; timings are not representative)")
    if not model.has_tokenizer:
        ctx.note("the model has no tokenizer: prompts become token ids by the byte fallback "
                 "(each UTF-8 byte b -> token id b)")
    if model.load_format == "dummy" and command == "check":
        ctx.note("dummy (random) weights: near-ties are common, and matching tokens only show that "
                 "the kernels agree with stock on these weights")

    max_model_len = args.max_model_len or d["max_model_len"]
    if model.max_position_embeddings and not args.max_model_len:
        max_model_len = min(max_model_len, model.max_position_embeddings)
    if max_tokens >= max_model_len:
        raise CliError(f"--max-tokens {max_tokens} leaves no room for a prompt in --max-model-len {max_model_len}")
    enforce_eager = args.enforce_eager or (not on_cuda and not args.compile)
    ctx.engine_args = {
        "model": model.model,
        # vLLM's "auto" picks bfloat16 on CPU even for float32 checkpoints; the tiny model is small
        # enough for float32, where check can demand identical tokens.
        "dtype": args.dtype or ("float32" if model.kind == "tiny" else "auto"),
        "seed": args.seed,
        "max_model_len": max_model_len,
        "enforce_eager": enforce_eager,
        "load_format": model.load_format,
        "skip_tokenizer_init": not model.has_tokenizer,
    }
    if on_cuda:
        ctx.engine_args["gpu_memory_utilization"] = args.gpu_memory_utilization
    ctx.engine_args.update(parse_json_dict(args.engine_args, "--engine-args"))
    return ctx


def parse_json_dict(text: str | None, flag: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{flag} is not valid JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag} must be a JSON object of vLLM engine arguments, got: {text}")
    return value


def runner_spec(ctx: Context, mode: str, side: str, extra_engine_args: dict | None = None,
                mirage_mode: str | None = None, tokens_per_step: int | None = None, **more) -> dict:
    """What the runner process needs for one side; ``mirage_mode`` and ``tokens_per_step`` override
    ``ctx.mode`` and ``ctx.tokens_per_step`` (bench runs one Mirage side per --mode and tokens per step)."""
    mirage_mode = mirage_mode or ctx.mode
    tokens = tokens_per_step or ctx.tokens_per_step
    per_mode = mode_engine_args(mirage_mode, ctx.model.model, tokens) if side == "mirage" else {}
    return {
        "mode": mode,
        "side": side,
        "model": ctx.model.to_spec(),
        "prompts": ctx.prompts,
        "max_tokens": ctx.max_tokens,
        "engine_args": {**ctx.engine_args, **per_mode, **(extra_engine_args or {})},
        "mirage_switch": switch_for(mirage_mode),
        **more,
    }
