"""Prompts: the file format, batching, and the tokenizer-less fallback.

File format: one prompt per line, UTF-8. Empty lines and lines starting with ``#`` are skipped. A
literal ``\\n`` (backslash, n) in a line becomes a newline, so one line can hold several
paragraphs; ``\\\\`` is a literal backslash.
"""

from __future__ import annotations

import re
from importlib import resources
from itertools import cycle, islice
from pathlib import Path

from vllm_mirage.cli.errors import CliError

DEFAULT_PROMPTS = "test_prompts.txt"


def default_prompts_path() -> Path:
    return Path(str(resources.files("vllm_mirage") / "data" / DEFAULT_PROMPTS))


def load_prompts(path: str | Path | None = None) -> list[str]:
    path = Path(path) if path is not None else default_prompts_path()
    if not path.is_file():
        raise CliError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"prompts file {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    prompts = [_unescape(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CliError(f"prompts file {path} has no prompts (only empty lines and # comments)")
    return prompts


# Only \n and \\ are escapes: prompts hold code, where "\t" or a regex's "\d" must stay as typed, and
# Chinese text, which the "unicode_escape" codec would mangle (it decodes bytes as Latin-1).
_ESCAPE = re.compile(r"\\([n\\])")


def _unescape(line: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else "\\", line.rstrip("\r"))


def take_batch(prompts: list, batch_size: int) -> list:
    """The first ``batch_size`` prompts, cycling through the list when it is shorter.

    Repeated prompts are fine for timing because the benchmark runs with prefix caching off.
    """
    return list(islice(cycle(prompts), batch_size))


def fallback_token_ids(text: str, vocab_size: int) -> list[int]:
    """Token ids for a model without a tokenizer (dummy-weight presets).

    Each UTF-8 byte ``b`` becomes id ``b`` (modulo the vocabulary for vocabularies under 256 ids).
    Qwen's byte-level BPE starts with the byte alphabet too, so lengths are in the same range as
    real tokenization would give (somewhat longer: no merges). Deterministic, always in-vocab, and
    never empty.
    """
    data = text.encode("utf-8") or b" "
    return [b % vocab_size for b in data]
