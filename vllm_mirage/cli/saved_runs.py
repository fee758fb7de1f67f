"""A bench's finished engine runs, kept in its output folder so that a stopped bench can go on (``--resume``).

A bench of a host-bound model needs several engine starts per side, and each start costs a minute or
more of engine start-up: the whole command can outlast a time limit on the GPU machine, or the machine itself.
Each engine run's result is saved as it finishes; run again with ``--resume``, the same command reuses
the runs whose key still matches and starts only the others.

The key is everything that decides what a run measures: the runner's spec (model, prompts, engine
arguments, batch sizes, iterations), the side and start, this package's source, the installed vLLM,
torch and Triton, the GPU and its driver, and the decode plan forced by ``VLLM_MIRAGE_PLAN``. A run saved under another
key is measured again, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import vllm_mirage
from vllm_mirage import tuning
from vllm_mirage.cli.launch import SideRun, file_label
from vllm_mirage.tuning.store import PLAN_ENV

# Spec fields that name this invocation's folders, not what is measured.
_PER_INVOCATION = ("profile_dir",)


class SavedRuns:
    def __init__(self, directory: Path, gpu: str | None):
        self.directory = directory
        self._environment = {
            "package": package_source_hash(),
            "versions": tuning.versions(),
            "gpu": gpu,
            "driver": tuning.driver_version(),
            "plan": _plan_text(),
        }
        self.reused: list[str] = []

    def key(self, run: SideRun) -> str:
        spec = {k: v for k, v in run.spec.items() if k not in _PER_INVOCATION}
        what = {"side": run.side, "label": run.label, "start": run.start, "spec": spec, **self._environment}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def path(self, run: SideRun) -> Path:
        return self.directory / f"{file_label(run.label)}-start{run.start + 1}.json"

    def load(self, run: SideRun) -> dict | None:
        """The saved result of this run, or None where there is none under this run's key."""
        try:
            saved = json.loads(self.path(run).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key(run) or not isinstance(saved.get("result"), dict):
            return None
        self.reused.append(self.path(run).name)
        return saved["result"]

    def forget_reused(self, runs: list[SideRun]) -> None:
        """These runs were loaded but are measured again after all (an interleaved start saved in part)."""
        names = {self.path(run).name for run in runs}
        self.reused = [name for name in self.reused if name not in names]

    def save(self, run: SideRun, result: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(run)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key(run), "result": result}))
        os.replace(tmp, path)  # a run stopped while writing leaves no half file behind


def package_source_hash() -> str:
    """One hash of this package's Python sources and data: a change to any kernel is a different bench."""
    root = Path(vllm_mirage.__file__).parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".json")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _plan_text() -> str | None:
    path = os.environ.get(PLAN_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text()
    except OSError:
        return f"unreadable: {path}"
