"""What kind of step vLLM is running, read from its forward context."""

from __future__ import annotations


def step_attention_metadata(layer_name: str):
    """This step's attention metadata for one attention layer, or None (no forward context, or a
    profiling/warm-up run without attention)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # micro-batching keeps one dict per micro-batch; the first describes the step
        meta = meta[0]
    return meta.get(layer_name) if isinstance(meta, dict) else meta


def max_query_len(layer_name: str) -> int | None:
    """The most tokens any request adds in this step (1: a pure decode; k + 1: a verify pass of k drafts),
    or None outside a step."""
    meta = step_attention_metadata(layer_name)
    return None if meta is None else getattr(meta, "max_query_len", None)


def full_graph_tokens(vllm_config) -> int:
    """The largest batch vLLM replays as a full CUDA graph (0: none). Read at each step: vLLM may lower
    the CUDA-graph mode after the model is built, when it learns what the attention backend supports."""
    compilation = vllm_config.compilation_config
    mode = getattr(compilation, "cudagraph_mode", None)
    if vllm_config.model_config.enforce_eager or mode is None or not mode.has_full_cudagraphs():
        return 0
    size = getattr(compilation, "max_cudagraph_capture_size", None) or getattr(compilation, "max_capture_size", 0)
    return size or 0
