"""Did Mirage actually run? Read from the ``mirage_status`` the Mirage side's model reported."""

from __future__ import annotations

from vllm_mirage.cli.errors import EXIT_NOT_APPLICABLE, EXIT_NOT_APPLIED, EXIT_OK


# --mode stock (check and bench): a control, the "Mirage" side is another stock engine (VLLM_USE_MIRAGE=0).
CONTROL_ASSESSMENT = "Control run (--mode stock): both sides are stock vLLM"


def assess_mirage(result: dict, wanted_mode: str = "fused") -> tuple[int, str]:
    """(exit code, one-line message) for the Mirage side's runner result; ``wanted_mode`` is what --mode asked."""
    status = result.get("mirage_status")
    if wanted_mode == "stock":
        if status and status.get("mode") not in (None, "off"):
            # The control's switch is off; a side that still ran Mirage is not a control.
            return EXIT_NOT_APPLIED, f"{CONTROL_ASSESSMENT}, but that side ran Mirage (mode {status['mode']})"
        return EXIT_OK, CONTROL_ASSESSMENT
    engine = result.get("engine", {})
    archs = engine.get("architectures") or []
    is_qwen3 = "Qwen3ForCausalLM" in archs and engine.get("model_type") == "qwen3"
    if status and wanted_mode.startswith("multi-token"):
        return _assess_multi_token(result, status, wanted_mode)
    if status and status.get("mode") not in (None, "off") and status.get("fused_layers", 0) > 0:
        text = f"Mirage applied: {status['mode']}, {status['fused_layers']} fused decoder layers"
        if status.get("mode") == "megakernel":
            steps = status.get("megakernel_steps", 0)
            text += f", {steps} decode steps through the megakernel task graph"
            if steps == 0:
                # The fused layers served every step: nothing about the megakernel was checked or timed.
                why = _listed(status.get("megakernel_declined") or []) or "no decode step reached it"
                return EXIT_NOT_APPLIED, f"{text}: the megakernel ran no decode step ({why})"
        elif wanted_mode == "megakernel":
            reason = status.get("megakernel_reason") or "the model did not report why"
            return EXIT_NOT_APPLIED, f"{text}, but the megakernel was requested and is off: {reason}"
        return EXIT_OK, text
    if not is_qwen3:
        what = ", ".join(archs) or "unknown architecture"
        reason = (status or {}).get("reason") or f"{what} (model_type {engine.get('model_type')!r}) is not dense Qwen3"
        return EXIT_NOT_APPLICABLE, f"Mirage did not apply: {reason}"
    if status is None and result.get("mirage_status_error"):
        reason = f"could not read mirage_status from the engine ({result['mirage_status_error']})"
    elif status is None:
        reason = (
            "vLLM did not use the plugin's Qwen3 model class (is vllm-mirage installed in the "
            "environment the engine runs in, and does VLLM_PLUGINS allow 'mirage'?)"
        )
    else:
        reason = status.get("reason") or "the model reports mode 'off' without a reason"
    return EXIT_NOT_APPLIED, f"Mirage was requested but not applied: {reason}"


def _assess_multi_token(result: dict, status: dict, mode: str) -> tuple[int, str]:
    """multi-token(-eagle): the draft model's decode steps must have run the megakernel; the target's steps
    are vLLM's verify passes (on the megakernel too for the EAGLE self-draft, up to the plan's limit)."""
    draft = status.get("draft")
    if not draft:
        return EXIT_NOT_APPLIED, (f"{mode} was requested but no Mirage draft model was built (is "
                                  "speculative_config's method draft_model or eagle, with a Qwen3 draft?)")
    text = f"Mirage applied: {mode}, draft model {draft.get('mode')}"
    steps = draft.get("megakernel_steps", 0)
    if draft.get("mode") != "megakernel" or steps == 0:
        why = draft.get("megakernel_reason") or draft.get("reason") or _listed(draft.get("megakernel_declined") or [])
        return EXIT_NOT_APPLIED, f"{text}: the megakernel drafted no step ({why or 'no decode step reached it'})"
    text += f", {steps} draft steps through the megakernel task graph"
    if status.get("mode") == "megakernel":  # the self-draft's target verifies there too (support.is_self_draft)
        text += f", {status.get('megakernel_steps', 0)} of the target's steps (verify passes)"
    if "draft_reads_target_cache" in draft:  # the EAGLE self-draft (models/self_draft.py)
        text += (", exact (the target's KV cache, one position ahead)" if draft["draft_reads_target_cache"]
                 else ", with its own KV cache (EAGLE's shift hides each sequence's first token)")
    spec = result.get("speculative") or {}
    if spec.get("acceptance_rate") is not None:
        text += (f", {100 * spec['acceptance_rate']:.1f}% of draft tokens accepted "
                 f"({spec['tokens_per_step']:.2f} tokens per engine step)")
    return EXIT_OK, text


def _listed(reasons: list[str], most: int = 3) -> str:
    more = f"; and {len(reasons) - most} more" if len(reasons) > most else ""
    return "; ".join(reasons[:most]) + more
