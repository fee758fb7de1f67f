"""``vllm-mirage tune``: measure the kernel paths of Qwen3 shapes on this GPU.

Without ``--output`` the plans go to the user's cache, where engines on this machine find them (the same
measurement an engine otherwise makes at its first start). With ``--output FILE`` they are written (merged
into FILE) as a table of the form shipped in ``vllm_mirage/data/tuning/``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_mirage.cli.errors import CliError
from vllm_mirage.cli.models import qwen3_preset_config


def preset_shape(name: str, tp: int = 1):
    from vllm_mirage.tuning import ModelShape

    cfg = qwen3_preset_config(name)
    return ModelShape(
        hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"] // tp,
        q_heads=cfg["num_attention_heads"] // tp, kv_heads=max(1, cfg["num_key_value_heads"] // tp),
        head_dim=cfg["head_dim"], tp=tp,
    )


def run_tune(args) -> int:
    import torch

    from vllm_mirage import tuning
    from vllm_mirage.tuning import store
    from vllm_mirage.tuning.measure import measure_plan

    if not torch.cuda.is_available():
        raise CliError("tune measures CUDA kernels: no CUDA GPU here")
    gpu = torch.cuda.get_device_name()
    table = {"gpu": gpu, "shapes": {}}
    out = Path(args.output) if args.output else None
    if out is not None and out.exists():
        table = json.loads(out.read_text())
        if table.get("gpu") != gpu:
            raise CliError(f"{out} is the table of {table.get('gpu')!r}, not of this {gpu!r}")
    for name in args.models:
        shape = preset_shape(name, args.tensor_parallel_size)
        print(f"{gpu}: measuring {name} ({shape.key()})", flush=True)
        plan = measure_plan(shape, torch.bfloat16)
        for kind, paths in plan.linear.items():
            print(f"  {kind:10s} " + "  ".join(f"{t}:{p}" for t, p in paths.items()))
        print(f"  fused layers up to {plan.fused_max_tokens} tokens", flush=True)
        if out is None:
            key = store.cache_key(gpu, tuning.driver_version(), tuning.versions(), shape)
            print(f"  cached in {store.save_cached(key, plan)}")
        else:
            entry = table["shapes"].get(shape.key(), {})
            # Decisions measured inside vLLM or by the megakernel's benchmark (its batch limit and launch
            # settings) and their sources are kept: this tool measures the layer ops' kernel paths only.
            kept = {k: entry[k] for k in ("megakernel_max_batch", "megakernel_launch") if k in entry}
            notes = {**entry.get("notes", {}), **plan.notes}
            table["shapes"][shape.key()] = {**plan.to_dict(), **kept, "notes": notes}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {out}")
    return 0
