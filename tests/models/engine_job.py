"""Run one vLLM engine on a model and dump what the tests compare, as JSON.

Each engine runs in its own process (``python engine_job.py SPEC_JSON OUT_JSON``): vLLM keeps
process-wide state (plugins loaded, distributed groups), so engines with different switches or
dtypes must not share a process.
"""

import json
import logging
import sys


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    records = _Records()
    logging.getLogger("vllm_mirage").addHandler(records)

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
    params = SamplingParams(
        temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=spec.get("logprobs", 2)
    )
    outs = llm.generate(spec["prompts"], params)
    result = {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        # Per generated token: {token_id: logprob} for the top candidates.
        "logprobs": [
            [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
            for o in outs
        ],
        "model": llm.apply_model(describe_model)[0],
    }
    # The model is built in the worker; in-process that is this process, so its log lines land here.
    result["mirage_log"] = records.lines
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
