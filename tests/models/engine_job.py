"""Run one vLLM engine on a model and dump what the tests compare, as JSON.

Each engine runs in its own process (``python engine_job.py SPEC_JSON OUT_JSON``): vLLM keeps
process-wide state (plugins loaded, distributed groups), so engines with different switches or
dtypes must not share a process.
"""

import json
import sys


def _probe_limits(llm, params, max_model_len: int) -> dict:
    """Edge cases whose handling belongs to vLLM: record what happens, for stock and Mirage alike."""
    from vllm import SamplingParams

    out = {"empty": len(llm.generate([], params))}
    try:
        llm.generate([{"prompt_token_ids": [7] * (max_model_len + 8)}], params)
        out["too_long"] = None
    except Exception as e:  # vLLM's own validation error is the expected outcome
        out["too_long"] = type(e).__name__
    # A prompt that leaves room for fewer tokens than asked: generation stops at max_model_len.
    near = llm.generate(
        [{"prompt_token_ids": [(13 * i) % 500 for i in range(max_model_len - 5)]}],
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
    )[0].outputs[0]
    out["near_limit"] = [list(near.token_ids), near.finish_reason]
    return out


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))

    if spec.get("set_use_mirage") is not None:
        # The Python switch, set in this (parent) process, must reach the engine-core child.
        from vllm_mirage import set_use_mirage

        set_use_mirage(spec["set_use_mirage"])
    from vllm import LLM, SamplingParams

    from vllm_mirage.introspect import describe_model

    llm = LLM(
        model=spec["model"],
        dtype=spec.get("dtype", "float32"),
        enforce_eager=spec.get("enforce_eager", True),
        max_model_len=spec.get("max_model_len", 512),
        seed=0,
        **spec.get("engine_args", {}),
    )
    if "score" in spec:
        # Teacher forcing: the logprob each given sequence's tokens get, so runs compare on the same tokens.
        outs = llm.generate(
            [{"prompt_token_ids": ids} for ids in spec["score"]],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
        )
        scores = [[lp[t].logprob for t, lp in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])] for o in outs]
        json.dump({"scores": scores, "model": llm.apply_model(describe_model)[0]}, open(out_path, "w"))
        return
    # Greedy unless the spec samples (seeded, so a run repeats).
    params = SamplingParams(
        temperature=spec.get("temperature", 0), seed=spec.get("seed"), max_tokens=spec["max_tokens"],
        ignore_eos=True, logprobs=spec.get("logprobs", 2),
    )
    outs = llm.generate(spec["prompts"], params)
    result = {
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        # Per generated token: {token_id: logprob} for the top candidates.
        "logprobs": [
            [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
            for o in outs
        ],
        "model": llm.apply_model(describe_model)[0],
    }
    if spec.get("engine_args", {}).get("disable_log_stats") is False:
        # What the verify passes accepted of the drafts: vLLM counts them in its stat metrics.
        from vllm_mirage.cli.runner import speculative_counters

        result["speculative"] = speculative_counters(llm)
    if spec.get("probe_limits"):
        result["limits"] = _probe_limits(llm, params, spec["max_model_len"])
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
