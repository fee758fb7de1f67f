"""Errors the CLI reports as one line, and the exit codes it uses."""

from __future__ import annotations

# Exit codes. Distinct values so scripts (and CI) can tell "tokens changed" from "could not run".
EXIT_OK = 0
EXIT_MISMATCH = 1  # check: a real token mismatch between stock and Mirage
EXIT_USAGE = 2  # bad arguments, missing/empty prompts file, unknown model (argparse uses 2 too)
EXIT_NOT_APPLICABLE = 3  # the model is not Qwen3: Mirage did not apply, as expected
EXIT_NOT_APPLIED = 4  # a Qwen3 model, Mirage requested, but the stock path ran, or the megakernel ran no step
EXIT_ENGINE = 5  # the engine failed: out of memory, crash, ...


class CliError(Exception):
    """An error with a one-line message for the user; main() prints it without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE, details: str = ""):
        super().__init__(message)
        self.exit_code = exit_code
        self.details = details  # printed before the message, e.g. the tail of an engine log


# Wordings of "not enough memory" across torch, CUDA and vLLM versions (KV-cache sizing included).
_OOM_MARKERS = (
    "outofmemoryerror",
    "out of memory",
    "no available memory for the cache blocks",
    "insufficient memory",
    "increase `gpu_memory_utilization`",
    "larger than the available kv cache memory",
)
_OOM_HINT = (
    "out of memory: try smaller --batch-sizes, a smaller --max-model-len, or a different "
    "--gpu-memory-utilization (on CPU: VLLM_CPU_KVCACHE_SPACE, in GiB)"
)
_HUB_UNREACHABLE = ("we couldn't connect to", "cannot find the requested files", "offline mode")


def classify_failure(text: str) -> str:
    """Turn a failed engine's output (exception text or stderr tail) into a one-line diagnosis."""
    low = text.lower()
    if any(m in low for m in _OOM_MARKERS):
        return _OOM_HINT
    if "vllm_use_mirage" in low and "is not valid" in low:
        line = next(l for l in reversed(text.splitlines()) if "is not valid" in l)
        return "invalid switch: " + line.split("ValueError:")[-1].strip()
    if any(m in low for m in _HUB_UNREACHABLE):
        return (
            "could not download the model from the Hugging Face hub (no network?): pass a local "
            "directory or a preset (qwen3-0.6b ... qwen3-32b, tiny)"
        )
    if "repository not found" in low or "is not a valid model identifier" in low:
        return "model not found on the Hugging Face hub: pass a local directory or a preset"
    last = last_error_line(text)
    return f"engine failed: {last}" if last else "engine failed (see the log)"


def last_error_line(text: str) -> str:
    """The most informative single line of a traceback: the last "SomethingError: ..." line."""
    lines = [l.strip(" |") for l in text.splitlines() if l.strip(" |")]
    for i in range(len(lines) - 1, -1, -1):
        head = lines[i].split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            # vLLM validates its config with pydantic, whose first line only says "1 validation
            # error for ModelConfig"; the reason is on a following "Value error, ..." line.
            detail = next((l for l in lines[i + 1:] if l.startswith("Value error, ")), None)
            if detail:
                return f"{head.rsplit('.', 1)[-1]}: {detail.removeprefix('Value error, ').split(' [type=')[0]}"
            return lines[i]
    return lines[-1] if lines else ""
