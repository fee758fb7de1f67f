import re

import pytest

from vllm_mirage.cli.errors import CliError
from vllm_mirage.cli.prompts import default_prompts_path, fallback_token_ids, load_prompts, take_batch


def test_bundled_prompts_are_varied():
    prompts = load_prompts()
    assert default_prompts_path().is_file()
    assert len(prompts) >= 120
    assert len(set(prompts)) == len(prompts)
    chinese = [p for p in prompts if re.search(r"[\u4e00-\u9fff]", p)]
    multi_paragraph = [p for p in prompts if "\n\n" in p]
    assert len(chinese) >= 15 and len(multi_paragraph) >= 10
    assert any("def " in p for p in prompts) and any("SELECT" in p for p in prompts)
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] <= 5 and lengths[-1] >= 800  # a few characters to several paragraphs
    # A prompt starting with '#' would be read as a comment; the C example hides behind text.
    assert any("#include <stdio.h>" in p for p in prompts)


def test_file_format(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\nfirst\n   \nline one\\nline two\n  # indented is a prompt\nregex \\d+ and \\\\n\r\n")
    assert load_prompts(f) == ["first", "line one\nline two", "  # indented is a prompt", "regex \\d+ and \\n"]


def test_escapes_keep_non_ascii_text(tmp_path):
    f = tmp_path / "zh.txt"
    f.write_text("你好\\n世界：\\\\n 不是换行\n", encoding="utf-8")
    assert load_prompts(f) == ["你好\n世界：\\n 不是换行"]


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(CliError, match="prompts file not found"):
        load_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CliError, match="has no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(CliError, match="not UTF-8"):
        load_prompts(tmp_path / "bin.txt")


def test_batches_cycle_through_prompts():
    assert take_batch(["a", "b", "c"], 2) == ["a", "b"]
    assert take_batch(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]


@pytest.mark.parametrize("vocab", [151936, 512, 100])
def test_fallback_is_deterministic_and_in_vocab(vocab):
    for text in ["Hello, world", "你好，世界", "tab\tand\nnewline", "", "é" * 50]:
        ids = fallback_token_ids(text, vocab)
        assert ids == fallback_token_ids(text, vocab)
        assert ids and all(0 <= i < vocab for i in ids)
    assert fallback_token_ids("AB", 151936) == [65, 66]
    assert len(fallback_token_ids("你好", vocab)) == 6  # one id per UTF-8 byte
    assert fallback_token_ids("ab", 512) != fallback_token_ids("ba", 512)
