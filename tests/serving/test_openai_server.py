"""`VLLM_USE_MIRAGE=1 vllm serve DIR`: the real OpenAI-compatible server answers as the stock one does."""

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
    def __init__(self, model: Path, mirage: bool, workdir: Path):
        self.port = _free_port()
        self.log = open(workdir / f"server-{'mirage' if mirage else 'stock'}.log", "w")
        env = subprocess_env(
            VLLM_USE_MIRAGE="1" if mirage else "0",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CACHE_ROOT=str(workdir / f"cache-{mirage}"),
        )
        # `vllm serve` itself cannot start on vllm-cpu 0.32: its CLI asks for the version of a
        # distribution named "vllm", and the CPU build is named "vllm-cpu". The module below is the
        # same server (what `vllm serve` runs), minus that lookup.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
             "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0"],
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
    work = tmp_path_factory.mktemp("serve")
    started = [Server(tiny_qwen3, mirage, work) for mirage in (False, True)]
    try:
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.stop()


@pytest.mark.slow
def test_mirage_server_answers_like_stock(servers):
    stock, mirage = servers
    expected = asyncio.run(_burst(stock))
    assert len(PROMPTS) == 32 and all(expected["completions"]), "stock server gave empty answers"
    first = asyncio.run(_burst(mirage))
    assert first == expected
    # Streaming delivers the same text as a plain request.
    assert first["streams"] == first["completions"][:4]

    # A second identical burst: same answers, server still up, no unbounded memory growth.
    rss_before = mirage.rss_bytes()
    second = asyncio.run(_burst(mirage))
    assert second == expected
    assert mirage.proc.poll() is None
    growth = mirage.rss_bytes() - rss_before
    assert growth < 256 * 2**20, f"server RSS grew by {growth / 2**20:.0f} MiB over one burst"
    assert "fused 2 Qwen3 decoder layers" in Path(mirage.log.name).read_text()
