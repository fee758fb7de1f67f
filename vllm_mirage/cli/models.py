"""What ``--model`` names: a local checkpoint, a Hugging Face id, or a preset.

Presets are the dense Qwen3 configurations with ``load_format="dummy"``: vLLM allocates the real
shapes and fills them with random values, so speed can be measured on any size without downloading
weights. There is no tokenizer then; see :mod:`vllm_mirage.cli.prompts` for how text becomes ids.

``random:<preset>`` is the same shape as a real checkpoint on disk: scaled random weights whose logits
are far from uniform, and a tokenizer (:mod:`vllm_mirage.random_model`), written once per cache
directory. ``random:<preset>+sliding[=W]`` is the same weights with a sliding attention window of W
tokens (default 128) in every layer; ``+layers=N`` keeps the preset's layer shapes with N layers, so a
large model's kernels are checked at the cost of a small one's engine start. Variants combine:
``random:qwen3-8b+layers=8+sliding``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vllm_mirage.cli.errors import CliError, last_error_line
from vllm_mirage.paths import cache_root

# (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
#  tie_word_embeddings), from the config.json of each Qwen/Qwen3-* checkpoint.
_QWEN3_SHAPES = {
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, True),
    "qwen3-4b": (2560, 9728, 36, 32, 8, True),
    "qwen3-8b": (4096, 12288, 36, 32, 8, False),
    "qwen3-14b": (5120, 17408, 40, 40, 8, False),
    "qwen3-32b": (5120, 25600, 64, 64, 8, False),
}
PRESETS = (*_QWEN3_SHAPES, "tiny")
RANDOM_PREFIX = "random:"
# Short enough that check's prompts and outputs cross it, so a kernel that ignores the window shows.
DEFAULT_SLIDING_WINDOW = 128


def qwen3_preset_config(name: str) -> dict:
    """config.json for a Qwen3 preset: the published values, with the fields vLLM reads."""
    hidden, inter, layers, heads, kv_heads, tied = _QWEN3_SHAPES[name]
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": layers,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "initializer_range": 0.02,
        "use_cache": True,
    }


@dataclass
class ResolvedModel:
    """A model as the engine child needs it, plus what the report says about it."""

    model: str  # what vLLM's LLM(model=...) receives: a directory or a hub id
    kind: str  # "preset", "tiny", "random", "local" or "hub"
    load_format: str = "auto"
    has_tokenizer: bool = True
    config: dict = field(default_factory=dict)  # config.json when we can read it here

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.config.get("max_position_embeddings")

    @property
    def is_qwen3(self) -> bool | None:
        """None when unknown here (a hub id: the child finds out)."""
        if not self.config:
            return None
        return "Qwen3ForCausalLM" in (self.config.get("architectures") or [])

    def to_spec(self) -> dict:
        return {
            "model": self.model,
            "kind": self.kind,
            "load_format": self.load_format,
            "has_tokenizer": self.has_tokenizer,
            "vocab_size": self.vocab_size,
        }


def resolve_model(name: str, cache_dir: Path | None = None) -> ResolvedModel:
    """Resolve ``--model``: an existing directory wins over a preset of the same name."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    path = Path(name).expanduser()
    if path.is_dir():
        return _local(path)
    key = name.lower()
    if key.startswith(RANDOM_PREFIX):
        return _random(key.removeprefix(RANDOM_PREFIX), cache_dir)
    if key == "tiny":
        return _tiny(cache_dir / "tiny-qwen3")
    if key in _QWEN3_SHAPES:
        return _preset(key, cache_dir / key)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CliError(f"model directory not found: {name}")
    if "/" not in name:
        # Hub ids are "org/name"; a bare word is a mistyped preset or a missing directory.
        raise CliError(
            f"unknown model {name!r}: not a directory, and the presets are {', '.join(PRESETS)} "
            f"(or {RANDOM_PREFIX}<preset> for saved random weights, e.g. {RANDOM_PREFIX}qwen3-0.6b)"
        )
    return ResolvedModel(model=name, kind="hub")


def _local(path: Path) -> ResolvedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CliError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    config = json.loads(config_file.read_text())
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    return ResolvedModel(
        model=str(path.resolve()),
        kind="local",
        # A config without weights is still useful for speed: let vLLM fill in random values.
        load_format="auto" if has_weights else "dummy",
        has_tokenizer=has_tokenizer,
        config=config,
    )


def _preset(name: str, directory: Path) -> ResolvedModel:
    config = qwen3_preset_config(name)
    directory.mkdir(parents=True, exist_ok=True)
    _write_if_changed(directory / "config.json", json.dumps(config, indent=2) + "\n")
    _write_if_changed(
        directory / "generation_config.json", json.dumps({"do_sample": False}) + "\n"
    )
    return ResolvedModel(
        model=str(directory), kind="preset", load_format="dummy", has_tokenizer=False, config=config
    )


def _tiny(directory: Path) -> ResolvedModel:
    from vllm_mirage.tiny_model import make_tiny_qwen3

    # make_tiny_qwen3 is seeded and deterministic; build once per cache dir (~7 s), reuse after.
    return _build_once(directory, make_tiny_qwen3, "tiny")


def _random(spec: str, cache_dir: Path, seed: int = 0) -> ResolvedModel:
    preset, *variants = spec.split("+")
    if preset not in _QWEN3_SHAPES:
        raise CliError(f"unknown model {RANDOM_PREFIX}{spec}: {RANDOM_PREFIX} takes one of {', '.join(_QWEN3_SHAPES)}")
    layers, window = _variants(variants, spec)
    config = qwen3_preset_config(preset)
    name = preset
    if layers is not None:
        config = {**config, "num_hidden_layers": layers, "max_window_layers": layers}
        name += f"-l{layers}"
    base = cache_dir / f"random-{name}-seed{seed}"
    resolved = _build_once(base, lambda tmp: _write_random(config, tmp, seed), "random")
    if window is None:
        return resolved
    # Same weights (linked, not copied: 16 GB for 8B), a config with the window in every layer: vLLM
    # takes one window for all layers, and max_window_layers 0 makes transformers' layer_types agree.
    config = {**config, "use_sliding_window": True, "sliding_window": window, "max_window_layers": 0}

    def link(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for f in base.iterdir():
            if f.name != "config.json":
                (tmp / f.name).symlink_to(Path("..", base.name, f.name))  # relative: the cache may move
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return _build_once(cache_dir / f"random-{name}+sliding{window}-seed{seed}", link, "random")


def _variants(variants: list[str], spec: str) -> tuple[int | None, int | None]:
    """(layers, sliding window) from ``+layers=N`` and ``+sliding[=W]``; None where not given."""
    found: dict[str, int] = {}
    for variant in variants:
        name, eq, value = variant.partition("=")
        number = int(value) if value.isdigit() and int(value) > 0 else None
        if name == "sliding" and (not eq or number) and name not in found:
            found[name] = number or DEFAULT_SLIDING_WINDOW
        elif name == "layers" and number and name not in found:
            found[name] = number
        else:
            raise CliError(f"unknown variant {variant!r} in {RANDOM_PREFIX}{spec}: the variants are "
                           "+sliding or +sliding=W (W > 0 tokens) and +layers=N (N > 0), each at most once")
    return found.get("layers"), found.get("sliding")


def _write_random(config: dict, directory: Path, seed: int) -> None:
    # In a child process: drawing on the GPU must not leave a CUDA context in this one, which stays
    # alive (and holding GPU memory) next to the engines it starts.
    print(f"vllm-mirage: writing a random checkpoint to {directory} (once per cache directory)", file=sys.stderr)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_mirage.random_model", str(directory / "config.json"), str(directory),
         "--seed", str(seed)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise CliError(f"writing the random checkpoint failed: {last_error_line(proc.stderr)}", details=proc.stderr[-3000:])


def _build_once(directory: Path, build, kind: str) -> ResolvedModel:
    if not (directory / "config.json").is_file():
        # Build next to the target and rename, so an interrupted build is never picked up.
        tmp = directory.with_name(f"{directory.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(directory, ignore_errors=True)
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    resolved = _local(directory)
    resolved.kind = kind
    return resolved


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
