"""`VLLM_USE_MIRAGE=1 vllm serve DIR`: the real OpenAI-compatible server answers as the stock one does, and so
does multi-token mode (`VLLM_USE_MIRAGE=megakernel` with the model as its own draft, through vLLM's
draft_model and EAGLE routes)."""

import json

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai  # the [test] extra installs it; a missing client must fail, not skip
import psutil
import pytest

from tests.conftest import subprocess_env

MAX_TOKENS = 16
# Mixed lengths: a few words up to a few hundred tokens of prompt.
PROMPTS = [
    ("The quick brown fox " * n)[: 20 + 37 * n] for n in range(1, 17)
] + [f"def f{i}(x):\n    return x * {i} +" for i in range(16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, name: str, switch: str, workdir: Path, draft_tokens: int = 0,
                 draft_method: str = "draft_model"):
        self.port = _free_port()
        self.log = open(workdir / f"server-{name}.log", "w")
        env = subprocess_env(
            VLLM_USE_MIRAGE=switch,
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CACHE_ROOT=str(workdir / f"cache-{name}"),
        )
        speculative = []
        if draft_tokens:
            speculative = ["--speculative-config", json.dumps(
                {"method": draft_method, "model": str(model), "num_speculative_tokens": draft_tokens})]
        # `vllm serve` itself cannot start on vllm-cpu 0.32: its CLI asks for the version of a
        # distribution named "vllm", and the CPU build is named "vllm-cpu". The module below is the
        # same server (what `vllm serve` runs), minus that lookup.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0", *speculative],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, process_group=0,
        )
        self.model = str(model)

    def wait_ready(self, timeout=240):
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early: see {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout}s: see {self.log.name}")

    def rss_bytes(self) -> int:
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        return sum(p.memory_info().rss for p in procs if p.is_running())

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


async def _burst(server: Server) -> dict:
    """32 concurrent completions of mixed lengths, 4 chats, and 4 streamed completions."""
    # One client per burst: an AsyncOpenAI client is bound to the event loop it first ran on.
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", timeout=120)

    async def complete(p):
        r = await c.completions.create(model=server.model, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].text

    async def chat(p):
        r = await c.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": p}], max_tokens=MAX_TOKENS, temperature=0
        )
        return r.choices[0].message.content

    async def stream(p):
        parts = []
        async for chunk in await c.completions.create(
            model=server.model, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ):
            parts.append(chunk.choices[0].text)
        return "".join(parts)

    completions = await asyncio.gather(*(complete(p) for p in PROMPTS))
    chats = await asyncio.gather(*(chat(p) for p in PROMPTS[:4]))
    streams = await asyncio.gather(*(stream(p) for p in PROMPTS[:4]))
    await c.close()
    return {"completions": completions, "chats": chats, "streams": streams}


@pytest.fixture(scope="module")
def servers(tiny_qwen3, tmp_path_factory):
    """Stock, fused (``1``) and multi-token: megakernel mode with the model drafting three tokens a step, as a
    draft model and as an EAGLE draft."""
    work = tmp_path_factory.mktemp("serve")
    started = [Server(tiny_qwen3, "stock", "0", work), Server(tiny_qwen3, "mirage", "1", work),
               Server(tiny_qwen3, "multi-token", "megakernel", work, draft_tokens=3),
               Server(tiny_qwen3, "multi-token-eagle", "megakernel", work, draft_tokens=3, draft_method="eagle")]
    try:
        for s in started:
            s.wait_ready()
        yield dict(zip(("stock", "mirage", "multi-token", "multi-token-eagle"), started))
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def stock_answers(servers):
    return asyncio.run(_burst(servers["stock"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mirage", "multi-token", "multi-token-eagle"])
def test_mirage_server_answers_like_stock(servers, stock_answers, name):
    server, expected = servers[name], stock_answers
    assert len(PROMPTS) == 32 and all(expected["completions"]), "stock server gave empty answers"
    first = asyncio.run(_burst(server))
    assert first == expected
    # Streaming delivers the same text as a plain request.
    assert first["streams"] == first["completions"][:4]

    # A second identical burst: same answers, server still up, no unbounded memory growth.
    rss_before = server.rss_bytes()
    second = asyncio.run(_burst(server))
    assert second == expected
    assert server.proc.poll() is None
    growth = server.rss_bytes() - rss_before
    assert growth < 256 * 2**20, f"server RSS grew by {growth / 2**20:.0f} MiB over one burst"
    log = Path(server.log.name).read_text()
    assert "fused 2 Qwen3 decoder layers" in log
    if name.startswith("multi-token"):
        # The draft model's decode steps ran the megakernel; the target's are verify passes, on the
        # megakernel too where the model drafts for itself through EAGLE.
        assert "decode and verify steps as one megakernel task graph up to 16 tokens" in log
        if name.endswith("eagle"):
            assert "speculative decoding (eagle)" not in log
        else:
            assert "speculative decoding (draft_model)" in log
    if name == "multi-token-eagle":  # the exact form: the draft reads the target's cache, no shift to warn of
        assert "never shows the draft a sequence's first token" not in log


async def _limited(server: Server, stops: list[str], max_tokens: list[int]) -> list:
    """Completions cut by a stop string or by max_tokens, plain and streamed: what a step that yields
    several tokens must never overshoot."""
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", timeout=120)

    async def complete(p, stop, n):
        r = await c.completions.create(model=server.model, prompt=p, max_tokens=n, temperature=0, stop=stop)
        return [r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens]

    async def stream(p, stop, n):
        parts, reason = [], None
        async for chunk in await c.completions.create(
            model=server.model, prompt=p, max_tokens=n, temperature=0, stop=stop, stream=True
        ):
            parts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return ["".join(parts), reason]

    cases = [(p, [stop], MAX_TOKENS) for p, stop in zip(PROMPTS, stops)]
    cases += [(p, None, n) for p, n in zip(PROMPTS, max_tokens)]
    out = await asyncio.gather(*(complete(*case) for case in cases), *(stream(*case) for case in cases))
    await c.close()
    return out


def _stop_string(text: str) -> str:
    """Three printable characters from the second half of ``text`` (the tiny model's text has control
    characters and broken UTF-8 pieces, which make poor stop strings)."""
    for i in range(len(text) // 2, len(text) - 2):
        if all(ch.isprintable() and ch != "\ufffd" for ch in text[i:i + 3]) and text[i:i + 3].strip():
            return text[i:i + 3]
    raise AssertionError(f"no printable stop string in {text!r}")


@pytest.mark.slow
def test_multi_token_server_stops_where_stock_stops(servers, stock_answers):
    # Stop strings taken from the middle of stock's own answers, so that each one does stop generation.
    stops = [_stop_string(t) for t in stock_answers["completions"][:8]]
    max_tokens = [1, 2, 3, 4, 5, 7, 9, 13]
    expected = asyncio.run(_limited(servers["stock"], stops, max_tokens))
    assert [e[1] for e in expected[:8]] == ["stop"] * 8 and all(e[2] == n for e, n in zip(expected[8:16], max_tokens))
    assert asyncio.run(_limited(servers["multi-token"], stops, max_tokens)) == expected
    assert asyncio.run(_limited(servers["multi-token-eagle"], stops, max_tokens)) == expected
