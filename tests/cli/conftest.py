import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

from vllm_mirage.cli.models import resolve_model


@pytest.fixture(scope="package")
def cli_cache(tmp_path_factory) -> Path:
    """A --cache-dir with the tiny preset already built (built once for all CLI tests, ~7 s)."""
    cache = tmp_path_factory.mktemp("cli-cache")
    resolve_model("tiny", cache)
    return cache


@pytest.fixture(scope="package")
def run_cli():
    """Run the installed ``vllm-mirage`` console script; return the CompletedProcess."""
    script = Path(sys.executable).with_name("vllm-mirage")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "vllm_mirage.cli.main"]

    def run(*args: str, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
        full_env = subprocess_env()
        full_env.pop("VLLM_USE_MIRAGE", None)  # the CLI sets it per side; a stray value is an error
        full_env.update(env or {})
        return subprocess.run([*base, *args], env=full_env, capture_output=True, text=True, timeout=timeout)

    return run


def clean_error(proc) -> str:
    """The CLI's last line of stderr, after checking that its own output (not the engine log's tail, shown
    as "  | ..." lines) has no traceback."""
    own = [line for line in proc.stderr.splitlines() if not line.startswith("  | ")]
    assert not any("Traceback" in line for line in own)
    return proc.stderr.strip().splitlines()[-1]


def prompts_file(path: Path, n: int) -> str:
    # Prompts of one length are prefilled in one step and then decoded together: one batch of n.
    path.write_text("".join(f"Prompt number {i:02d} asks the model\n" for i in range(n)))
    return str(path)
