"""Build a tiny, real Qwen3 checkpoint (config, safetensors, tokenizer) on the fly.

Used by the CPU demo, the CLI's ``tiny`` preset and the tests: there is no model hub here, and a
test on a model whose greedy output just repeats the prompt proves nothing. So the weights are drawn
with a larger std than transformers' default and the norm weights are perturbed, which gives varied
greedy continuations. Everything is seeded: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

# Enough varied text for a byte-level BPE to learn a few hundred merges.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
Large language models predict the next token from the tokens before it.
The derivative of x squared is two x; the integral of one over x is the log of x.
Memory bandwidth, not arithmetic, bounds the decode step of a transformer at small batch.
你好，世界。今天天气很好，我们去公园散步吧。
for i in range(10): print(i * i)
SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;
Paris is the capital of France, and Berlin is the capital of Germany.
Once upon a time there was a small kernel that wanted to run the whole model by itself.
"""

TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,  # vLLM's CPU attention rejects head_dim 16/32 in some builds; 64 is safe everywhere
    vocab_size=512,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def make_tiny_qwen3(
    path: str | Path,
    *,
    seed: int = 0,
    std: float = 0.15,
    embed_std: float | None = None,
    with_tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write a tiny Qwen3ForCausalLM checkpoint to ``path`` and return it.

    ``overrides`` replace entries of :data:`TINY_CONFIG` (e.g. ``num_hidden_layers=4``).
    ``embed_std`` (default ``std``) scales the embeddings and lm_head: with a large vocabulary, a
    larger value spreads the logits so that greedy choices are not bf16-rounding near-ties.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3Config(**{**TINY_CONFIG, **overrides}, torch_dtype="float32")
    if with_tokenizer:
        tokenizer = make_tokenizer(cfg.vocab_size)
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        save_tokenizer(tokenizer, path)

    model = Qwen3ForCausalLM(cfg)
    randomize_weights_(model, seed=seed, std=std, embed_std=embed_std)
    model.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return path


def randomize_weights_(model, *, seed: int = 0, std: float = 0.15, embed_std: float | None = None) -> None:
    """Fill a Qwen3ForCausalLM's parameters in place, in ``named_parameters`` order from one seeded
    generator: norm weights 1 + 0.3 randn, embeddings and lm_head ``embed_std`` randn (default
    ``std``), every other weight ``std`` randn. :func:`make_tiny_qwen3` writes the result."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif embed_std is not None and name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(vocab_size: int, special_ids: list[int] | None = None):
    """A byte-level BPE trained on a small built-in corpus, covering ids ``0 .. vocab_size - 1``.

    Without ``special_ids`` the special tokens (end of text, ChatML's start and end) take ids 0-2 and
    added pad tokens fill the vocabulary (the tiny checkpoint). With them, the specials sit at those
    ids (Qwen3's: 151643-151645) and plain word tokens fill every other id, so a model of a real
    vocabulary size decodes any id it picks to text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096),  # the corpus supports a few hundred merges at most
        special_tokens=_SPECIALS if special_ids is None else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if special_ids is None:
        # Pad the vocabulary up to the model's size so every logit maps to a token.
        missing = vocab_size - tok.get_vocab_size()
        if missing > 0:
            tok.add_tokens([f"<|pad_{i}|>" for i in range(missing)])
    else:
        tok = _fill_vocab(tok, vocab_size, dict(zip(_SPECIALS, special_ids)))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    # A minimal ChatML template so chat completions work against the model.
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def save_tokenizer(tokenizer, path: Path) -> None:
    """``save_pretrained``, readable by transformers 4 as well: transformers 5 names its own class
    ("TokenizersBackend", unknown to 4) and keeps the chat template only in chat_template.jinja."""
    tokenizer.save_pretrained(path)
    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=tokenizer.chat_template)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _fill_vocab(tok, vocab_size: int, specials: dict[str, int]):
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    ids = {i: t for t, i in specials.items()}
    for i in range(len(vocab), vocab_size):
        # "Ġ" is the byte-level alphabet's space: id i decodes to " w<i>". No merge produces these
        # tokens, so they never appear when encoding; the corpus holds no "w" followed by digits.
        vocab[ids.get(i, f"Ġw{i}")] = i
    # Added tokens take their vocabulary id when they have one (else the next free id, whatever "id" says).
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in specials.items()
    ]
    return Tokenizer.from_str(json.dumps(spec))
