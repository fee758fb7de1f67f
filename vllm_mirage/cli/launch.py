"""Start one side's engine in a fresh process and collect its JSON result (parent side).

This module never imports vLLM or torch: the parent stays light, and every engine gets a clean GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vllm_mirage.cli.errors import EXIT_ENGINE, CliError

# VLLM_USE_MIRAGE per side; the Mirage side's value is --mode's ("1" = fused, or "megakernel").
SIDES = {"stock": "0", "mirage": "1"}
LOG_TAIL_LINES = 15


def has_cuda_gpu() -> bool:
    """A CUDA GPU is visible, judged without initialising CUDA in this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def side_env(side: str, cache_root: Path, on_cuda: bool, mirage_switch: str = SIDES["mirage"]) -> dict:
    env = dict(os.environ)
    env["VLLM_USE_MIRAGE"] = mirage_switch if side == "mirage" else SIDES[side]
    # One compile cache for every engine of a command: the compiled module is stock's Qwen3Model in every
    # Mirage mode (the fused layers and the megakernel run beside it, tests/models/test_compiled_and_limits.py),
    # so later engines load what the first compiled and run the same code. vLLM also points Triton's
    # cache inside it, so the fused ops and the megakernel compile once too (~25-30 s and ~20 s an engine on
    # an H200). A VLLM_CACHE_ROOT the user set is theirs to share across commands; else a fresh one.
    env["VLLM_CACHE_ROOT"] = os.environ.get("VLLM_CACHE_ROOT") or str(cache_root)
    # apply_model() pickles vllm_mirage.introspect.mirage_status to the worker; vLLM wants this opt-in for that.
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    if not on_cuda:
        # The CPU backend sizes its KV cache from this (GiB); its default does not fit small machines.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # One process instead of three: halves start-up time, and the CPU numbers are only indicative.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


@dataclass
class SideRun:
    side: str
    label: str  # "stock", "mirage", or "stock[1]" for the second of several baselines
    spec: dict
    steps: int  # progress steps the runner will report
    start: int = 0  # which engine start of this side (bench --starts): its own log file


def run_side(run: SideRun, workdir: Path, log_dir: Path, on_cuda: bool, verbose: bool) -> dict:
    """Run one side; return its result dict or raise CliError with a one-line diagnosis."""
    runner = RunnerProcess(run, workdir, log_dir, on_cuda, verbose)
    try:
        _follow_progress(runner.lines, run)
        code = runner.proc.wait()
    except BaseException:
        runner.kill()
        raise
    return runner.result(code)


class RunnerProcess:
    """One side's runner process: its own process group, a log file, a progress pipe and, for a runner
    driven command by command (``bench --interleave``), its stdin."""

    def __init__(self, run: SideRun, workdir: Path, log_dir: Path, on_cuda: bool, verbose: bool,
                 commands: bool = False):
        self.run, self.verbose = run, verbose
        side_dir = Path(tempfile.mkdtemp(prefix=f"{run.side}-", dir=workdir))
        spec_path, self.result_path = side_dir / "spec.json", side_dir / "result.json"
        spec_path.write_text(json.dumps(run.spec))
        self.log_path = log_dir / f"{file_label(run.label)}{f'-start{run.start + 1}' if run.start else ''}.log"
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "vllm_mirage.cli.runner", str(spec_path), str(self.result_path), str(write_fd)]
        env = side_env(run.side, workdir / "vllm-cache", on_cuda, run.spec.get("mirage_switch", SIDES["mirage"]))
        with open(self.log_path, "w") as log:
            out = None if verbose else log
            # Its own process group: the runner and vLLM's engine processes stop together if this command does.
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out, pass_fds=(write_fd,),
                                         stdin=subprocess.PIPE if commands else subprocess.DEVNULL,
                                         start_new_session=True, text=True)
        os.close(write_fd)
        self.lines = os.fdopen(read_fd)

    def next_step(self) -> str:
        """The runner's next progress line; a runner that exits instead is reported with its diagnosis."""
        line = self.lines.readline()
        if not line:
            self.result(self.proc.wait())  # raises: a runner that stopped early has no good result
            raise CliError(f"{self.run.label} side stopped before its work was done (log: {self.log_path})",
                           EXIT_ENGINE)
        return line.strip()

    def command(self, op: str, batch: int | None = None) -> str:
        """Send one command and wait until the runner has carried it out."""
        try:
            self.proc.stdin.write(json.dumps({"op": op, "batch": batch}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the runner is gone: next_step reports why
        return self.next_step()

    def finish(self) -> dict:
        self.proc.stdin.close()  # end of commands: the runner writes its result and exits
        for _ in self.lines:
            pass
        return self.result(self.proc.wait())

    def kill(self) -> None:
        _kill_group(self.proc)

    def result(self, code: int) -> dict:
        if not self.result_path.is_file():
            raise CliError(
                f"{self.run.label} side exited with code {code} without a result (log: {self.log_path})",
                EXIT_ENGINE,
                details="" if self.verbose else _tail(self.log_path),
            )
        result = json.loads(self.result_path.read_text())
        if not result.get("ok"):
            raise CliError(
                f"{self.run.label} side: {result['diagnosis']} (log: {self.log_path})",
                EXIT_ENGINE,
                details="" if self.verbose else _tail(self.log_path),
            )
        result["label"] = self.run.label
        result["log"] = None if self.verbose else str(self.log_path)
        return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _follow_progress(lines, run: SideRun) -> None:
    bar = tqdm(total=run.steps, desc=f"{run.label:>8}", unit="step", file=sys.stderr, leave=True)
    with lines:
        for line in lines:  # ends when the runner exits (or closes the pipe)
            bar.set_postfix_str(line.strip(), refresh=False)
            bar.update(1)
    bar.close()


def _tail(log_path: Path) -> str:
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    return "\n".join(f"  | {l}" for l in lines[-LOG_TAIL_LINES:])


def file_label(label: str) -> str:
    # "stock[1]" -> "stock-1"
    return re.sub(r"[^\w-]+", "-", label).strip("-")
