"""What the plugin did to a model, for ``LLM.apply_model(describe_model)``.

A module-level function, so vLLM can ship it to an engine process by reference (a lambda or a
function defined in ``__main__`` does not unpickle there). Multiprocess engines also need
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` for ``apply_model``.
"""

import weakref

from torch import nn

# Mirage draft models built in this process (vLLM's draft-model speculative decoding), oldest first. vLLM's
# ``apply_model`` reaches the target model only; its status reports the newest live draft's beside it.
_drafts: list[weakref.ref] = []


def register_draft(model: nn.Module) -> None:
    _drafts[:] = [ref for ref in _drafts if ref() is not None] + [weakref.ref(model)]


def mirage_status(model: nn.Module) -> dict | None:
    """``{"mode", "fused_layers", "reason", ...}``, or None when our model class was not used (another
    architecture, or the plugin did not load). In megakernel mode, ``megakernel_steps`` counts the decode
    steps the task graph ran (CUDA-graph replays and vLLM's warm-up runs included) and ``megakernel_declined``
    why other decode steps took the fused layers. With a Mirage draft model in the same process (draft-model
    speculative decoding), ``draft`` holds the draft's status."""
    status = getattr(model, "mirage_status", None)
    if status is None:
        return None
    status = dict(status)  # a snapshot: in-process engines hand the caller this object itself
    decoder = getattr(model, "_megakernel", None)
    if decoder is not None:
        status["megakernel_steps"] = decoder.steps()
        status["megakernel_declined"] = decoder.declined()
    draft = next((d for d in (ref() for ref in reversed(_drafts)) if d is not None), None)
    if status.get("role") != "draft" and draft is not None:
        status["draft"] = mirage_status(draft)
    return status


def describe_model(model: nn.Module) -> dict:
    from vllm_mirage import ops

    fused = getattr(model, "_fused", None)
    return {
        "class": type(model).__name__,
        "mirage_status": mirage_status(model),
        "module_types": sorted({type(m).__name__ for m in model.modules()}),
        # The fused decoder holds references beside the model, outside its module tree.
        "fused_module_types": sorted({type(m).__name__ for m in fused.modules()}) if fused is not None else [],
        "params": [[name, list(p.shape)] for name, p in model.named_parameters()],
        "state_dict_keys": sorted(model.state_dict().keys()),
        # Calls of each fused op in this process, by backend ("triton" or "reference").
        "dispatch_counts": [[op, backend, n] for (op, backend), n in ops.dispatch_counts.items()],
    }
