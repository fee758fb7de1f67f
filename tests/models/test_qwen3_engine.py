"""The plugin inside real vLLM (CPU build): fused Qwen3 gives stock vLLM's tokens, and really ran."""

import pytest

from tests.conftest import PROMPTS

MAX_TOKENS = 24
FUSED_TYPES = {"MirageQwen3DecoderLayer", "FusedRMSNormQKV", "FusedQKNormRope", "FusedRMSNormGateUp"}


def _spec(model, dtype="float32", **kw):
    return {"model": str(model), "dtype": dtype, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, **kw}


@pytest.fixture(scope="module")
def stock_fp32(tiny_qwen3, run_engine):
    return run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "0"})


@pytest.fixture(scope="module")
def mirage_fp32(tiny_qwen3, run_engine):
    return run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "1"})


def test_checkpoint_is_not_degenerate(stock_fp32):
    # A tiny model that just repeats a token would make every equality below meaningless.
    for ids in stock_fp32["token_ids"]:
        assert len(set(ids)) >= 4, ids
    gaps = []
    for steps in stock_fp32["logprobs"]:
        for step in steps:
            top = sorted(step.values(), reverse=True)
            gaps.append(top[0] - top[1])
    assert sorted(gaps)[len(gaps) // 2] > 0.05, "median top-1/top-2 logprob gap is tiny"


def test_stock_vllm_matches_transformers(tiny_qwen3, stock_fp32):
    """The setup itself is sound: stock vLLM and HF transformers agree on this checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    for prompt, vllm_ids in zip(PROMPTS, stock_fp32["token_ids"]):
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out[0, inputs["input_ids"].shape[1] :].tolist() == vllm_ids, prompt


def test_fused_tokens_equal_stock_fp32(stock_fp32, mirage_fp32):
    assert mirage_fp32["token_ids"] == stock_fp32["token_ids"]


def test_fused_modules_ran_inside_engine(stock_fp32, mirage_fp32):
    model = mirage_fp32["model"]
    status = model["mirage_status"]
    assert (status["mode"], status["fused_layers"], status["reason"]) == ("fused", 2, None)
    assert status["plan"].startswith("reference") and status["megakernel_max_batch"] == 0
    assert FUSED_TYPES <= set(model["fused_module_types"])
    # The stock layers stay in the model (and compiled): prefill and mixed batches run them.
    assert "Qwen3DecoderLayer" in model["module_types"] and not FUSED_TYPES & set(model["module_types"])
    # The fused ops were called in the forward passes (counted inside the ops themselves).
    called = {op for op, _backend, n in model["dispatch_counts"] if n > 0}
    assert {"rms_norm_linear", "qk_norm_rope", "rms_norm_linear_silu_mul", "add_rms_norm"} <= called
    assert any("fused 2 Qwen3 decoder layers" in line for line in mirage_fp32["mirage_log"])
    # And with the switch off nothing was built.
    assert stock_fp32["model"]["mirage_status"]["mode"] == "off"
    assert not stock_fp32["model"]["fused_module_types"] and not stock_fp32["model"]["dispatch_counts"]


def test_parameters_identical_on_and_off(stock_fp32, mirage_fp32):
    stock = dict(map(tuple, stock_fp32["model"]["params"]))
    fused = {name: shape for name, shape in mirage_fp32["model"]["params"]}
    assert list(stock) == list(fused), "parameter names or order differ"
    for name, shape in stock.items():
        if fused[name] != shape:
            # vLLM's CPU linear repacks weights for oneDNN and frees the original after loading;
            # the fused path asks it to keep the qkv_proj/gate_up_proj weights it reads directly.
            assert shape == [0] and name.endswith(("qkv_proj.weight", "gate_up_proj.weight")), name
            assert len(fused[name]) == 2 and min(fused[name]) > 0, name
    assert stock_fp32["model"]["state_dict_keys"] == mirage_fp32["model"]["state_dict_keys"]


def test_switch_reaches_engine_process(tiny_qwen3, run_engine, stock_fp32):
    """set_use_mirage() in the parent reaches the engine-core child process."""
    result = run_engine(
        _spec(tiny_qwen3, set_use_mirage=True),
        env={
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
            "VLLM_USE_MIRAGE": "0",
            # apply_model ships a function to the engine process, which needs pickle there.
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        },
    )
    assert result["model"]["mirage_status"]["mode"] == "fused"
    assert "fused 2 Qwen3 decoder layers" in result["stderr"]  # logged by the worker process
    assert result["token_ids"] == stock_fp32["token_ids"]


def test_tensor_parallel_shards_give_the_same_tokens(tiny_qwen3, run_engine, stock_fp32):
    """TP=2 (two CPU workers, gloo): each rank's fused modules read its own qkv/gate_up shards. Asked for
    the megakernel, which has no all-reduce, the engine refuses it and serves with the fused layers."""
    result = run_engine(
        _spec(tiny_qwen3, engine_args={"tensor_parallel_size": 2}),
        env={
            "VLLM_USE_MIRAGE": "megakernel",
            "VLLM_CPU_OMP_THREADS_BIND": "0|1",  # one core per worker; "auto" wants a NUMA node each
            "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
        },
    )
    status = result["model"]["mirage_status"]
    assert status["mode"] == "fused" and status["fused_layers"] == 2
    assert status["megakernel_reason"].startswith("tensor/pipeline parallelism"), status
    shapes = dict(map(tuple, result["model"]["params"]))
    # Column-parallel qkv_proj: half the 4 q heads and 1 of the 2 kv heads, of head_dim 64, per rank.
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == [(2 + 1 + 1) * 64, 128]
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == [2 * 128, 128]
    assert result["token_ids"] == stock_fp32["token_ids"]


def test_triton_kernels_inside_vllm_give_stock_tokens(tiny_qwen3, run_engine, stock_fp32):
    """The real Triton kernels (in Triton's interpreter) drive the engine: same greedy tokens."""
    result = run_engine(_spec(tiny_qwen3), env={"VLLM_USE_MIRAGE": "1", "TRITON_INTERPRET": "1"})
    counts = {(op, backend): n for op, backend, n in result["model"]["dispatch_counts"]}
    for op in ("rms_norm_linear", "qk_norm_rope", "rms_norm_linear_silu_mul"):
        assert counts.get((op, "triton"), 0) > 0 and (op, "reference") not in counts, op
    assert result["token_ids"] == stock_fp32["token_ids"]


def test_lora_enabled_falls_back_with_reason(tiny_qwen3, run_engine, stock_fp32):
    result = run_engine(_spec(tiny_qwen3, engine_args={"enable_lora": True}), env={"VLLM_USE_MIRAGE": "1"})
    status = result["model"]["mirage_status"]
    assert status["mode"] == "off" and status["reason"].startswith("LoRA is enabled")
    assert result["token_ids"] == stock_fp32["token_ids"]
