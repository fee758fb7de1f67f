"""Can this model take the fused path? Each check returns a reason string when it cannot.

The rule is: run a model through our kernels only when every assumption they make holds; otherwise
leave vLLM's stock path in place and say why. Wrong tokens are never an acceptable fallback.
"""

import torch
from torch import nn

# The Triton kernels are written and measured for 16-bit weights on CUDA. On CPU (CI, laptops) the
# fused modules run the PyTorch references (or the kernels in Triton's interpreter), where float32 is
# the precision the token-equality tests use.
SUPPORTED_DTYPES = {
    "cuda": (torch.bfloat16, torch.float16),
    "cpu": (torch.float32, torch.bfloat16),
}


def platform_name() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    return str(getattr(current_platform, "device_name", "unknown"))


def model_unsupported_reason(vllm_config) -> str | None:
    """Whole-model checks, made before any layer is touched."""
    hf_config = vllm_config.model_config.hf_config
    platform = platform_name()
    if platform not in SUPPORTED_DTYPES:
        return f"platform {platform!r} is not supported (CUDA and CPU are)"
    dtype = vllm_config.model_config.dtype
    if dtype not in SUPPORTED_DTYPES[platform]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES[platform])
        return f"dtype {str(dtype).removeprefix('torch.')} is not supported on {platform} ({allowed} are)"
    if vllm_config.quant_config is not None:
        name = vllm_config.quant_config.get_name()
        return f"quantized weights ({name}) are not supported: the kernels read 16-bit weights"
    if vllm_config.lora_config is not None:
        return "LoRA is enabled: adapters add deltas around qkv_proj/gate_up_proj that the fused kernels skip"
    if getattr(hf_config, "model_type", None) != "qwen3":
        return f"model_type {getattr(hf_config, 'model_type', None)!r} is not dense Qwen3"
    if not getattr(hf_config, "is_causal", True):
        return "bidirectional (is_causal=False) Qwen3 variants are not supported"
    if getattr(hf_config, "dual_chunk_attention_config", None):
        return "dual-chunk attention is not supported"
    if getattr(hf_config, "attention_bias", False):
        return "attention_bias=True is not supported"
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        return f"activation {hf_config.hidden_act!r} is not supported (silu is)"
    parallel = getattr(vllm_config, "parallel_config", None)
    if parallel is not None and parallel.pipeline_parallel_size > 1:
        # The fused decoder runs embedding, every layer and the final norm in one rank's forward.
        return "pipeline parallelism is not supported (tensor parallelism is)"
    return None


def layer_unsupported_reason(layer: nn.Module) -> str | None:
    """Per-layer checks on the modules the fused kernels will read through."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding

    attn = layer.self_attn
    for name, linear in (("qkv_proj", attn.qkv_proj), ("gate_up_proj", layer.mlp.gate_up_proj)):
        if not isinstance(linear.quant_method, UnquantizedLinearMethod):
            return f"{name} uses {type(linear.quant_method).__name__}, not unquantized weights"
        if getattr(linear, "bias", None) is not None:
            return f"{name} has a bias"
    rope = attn.rotary_emb
    # Scaled variants (YaRN, dynamic NTK, mrope...) subclass RotaryEmbedding and some change
    # forward(): only the plain class is known to be "look up cos/sin by position, rotate".
    if type(rope) is not RotaryEmbedding:
        return f"rotary embedding {type(rope).__name__} is not supported (plain RotaryEmbedding is)"
    if not rope.is_neox_style or rope.rotary_dim != attn.head_dim:
        return "only neox-style rotary over the full head dim is supported"
    return None


def megakernel_unsupported_reason(vllm_config, draft: bool = False) -> str | None:
    """Checks for the megakernel decode path, on top of the fused path's: every reason that applies,
    joined by "; ". Called once the model's layers exist: attention windows are read from the layers
    vLLM built.

    Speculative decoding turns the megakernel off for the target model for the whole run rather than step
    by step. EAGLE-3 drafters read the target's hidden states from intermediate layers, which the task graph
    never hands out. n-gram steps that found no draft are pure decode, but sending those to the megakernel
    and the rest to the fused layers would make a request's rounding depend on whether a draft was found.
    Two exceptions: a draft model (``method: draft_model``), whose decode steps are plain one-token steps
    of a Qwen3 model (the verify pass decides every token the user sees, so which path drafted only moves
    acceptance); and the model drafting for itself through EAGLE (:func:`is_self_draft`), whose target
    takes the megakernel for its verify passes too (a few rows a request; the draft reads no hidden state),
    so draft and verify round alike."""
    reasons = []
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        reasons.append("tensor/pipeline parallelism needs all-reduces inside the task graph (not implemented)")
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        reasons.append(f"KV-cache dtype {vllm_config.cache_config.cache_dtype} is not supported")
    head_dim = getattr(vllm_config.model_config.hf_config, "head_dim", 0) or 0
    if head_dim < 32 or head_dim & (head_dim - 1):
        reasons.append(f"head_dim {head_dim} is not a power of two >= 32")
    window = attention_window(vllm_config)
    if window is not None:
        reasons.append(f"sliding-window attention (window {window}): the megakernel attends over the whole context")
    speculative = getattr(vllm_config, "speculative_config", None)
    if speculative is not None and not (draft or is_draft_model(vllm_config) or is_self_draft(vllm_config)):
        method = getattr(speculative, "method", None) or "draft model"
        if method == "draft_model":
            reasons.append("speculative decoding (draft_model): the target's steps are verify passes of several "
                           "tokens per request; a Qwen3 draft model's one-token steps take the megakernel")
        else:
            reasons.append(f"speculative decoding ({method}): drafters may need intermediate hidden states and "
                           "verify steps score several tokens per request")
    return "; ".join(reasons) or None


def attention_window(vllm_config) -> int | None:
    """The sliding window of the model's attention layers as vLLM built them, or None when every layer
    attends over the whole context. Each Attention layer registers itself in the compilation config's
    forward context and holds the window vLLM decided for it (from ``sliding_window`` /
    ``use_sliding_window`` / ``layer_types``, model-wide or per layer depending on the vLLM version)."""
    layers = vllm_config.compilation_config.static_forward_context.values()
    return next((w for w in (getattr(layer, "sliding_window", None) for layer in layers) if w), None)


def is_self_draft(vllm_config) -> bool:
    """The model drafts for itself through vLLM's EAGLE speculator (``models/self_draft.py``): method
    ``eagle`` with the target's own checkpoint as the draft."""
    speculative = getattr(vllm_config, "speculative_config", None)
    draft = getattr(speculative, "draft_model_config", None)
    model = getattr(draft, "model", None)
    return (getattr(speculative, "method", None) == "eagle" and model is not None
            and model == getattr(vllm_config.model_config, "model", None))


def is_draft_model(vllm_config) -> bool:
    """This config builds the draft model of vLLM's draft-model speculative decoding: vLLM hands the drafter
    the target's config with ``model_config`` replaced by the speculative config's draft model config."""
    speculative = getattr(vllm_config, "speculative_config", None)
    return (speculative is not None and getattr(speculative, "method", None) == "draft_model"
            and vllm_config.model_config is getattr(speculative, "draft_model_config", None))
