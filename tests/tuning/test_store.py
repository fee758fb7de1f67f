"""Where plans come from: shipped tables, the per-machine cache (keyed, invalidated, corruption ignored),
and the first-use measurement, with the measurement itself replaced by a stand-in (it needs CUDA)."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from vllm_mirage import tuning
from vllm_mirage.cli.tune import preset_shape
from vllm_mirage.tuning import store
from vllm_mirage.tuning.plan import KINDS, ROW, TOKENS, UNFUSED, DecodePlan

SHAPE = preset_shape("qwen3-8b")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_MIRAGE_CACHE", str(tmp_path))
    monkeypatch.delenv(store.PLAN_ENV, raising=False)
    return tmp_path / "tuning"


@pytest.fixture
def warnings():
    """What the store logs (vLLM's logger tree does not propagate to pytest's caplog once vLLM is imported)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    store.logger.addHandler(handler)
    yield records
    store.logger.removeHandler(handler)


def _plan(megakernel=0):
    return DecodePlan({k: {t: ROW if k == "norm" and t == 1 else UNFUSED for t in TOKENS} for k in KINDS}, 1,
                      megakernel, source="test")


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
@pytest.mark.parametrize("model", ["qwen3-0.6b", "qwen3-1.7b", "qwen3-8b"])
def test_shipped_tables_cover_the_measured_gpus(gpu, model):
    plan = store.shipped_plan(gpu, preset_shape(model))
    assert plan is not None and plan.source == f"shipped table for {gpu}"
    assert 0 <= plan.megakernel_max_batch <= 16


def test_no_shipped_plan_for_other_gpus_or_shapes():
    assert store.shipped_plan("NVIDIA A100-SXM4-80GB", SHAPE) is None
    assert store.shipped_plan("NVIDIA H200", preset_shape("qwen3-8b", tp=2)) is None


def test_cache_round_trip_and_stale_key(warnings):
    key = store.cache_key("Some GPU", "driver 1", {"torch": "2.11"}, SHAPE)
    path = store.save_cached(key, _plan())
    assert path.parent == store.cache_dir() and store.load_cached(key).linear == _plan().linear
    updated = store.cache_key("Some GPU", "driver 2", {"torch": "2.11"}, SHAPE)
    assert store.load_cached(updated) is None
    assert any("stale" in w for w in warnings)


@pytest.mark.parametrize("content", [
    lambda key: "{not json",
    lambda key: "[]",
    lambda key: "",
    lambda key: json.dumps({"key": key, "plan": {"linear": "garbage"}}),
], ids=["truncated", "not-an-object", "empty", "bad-plan"])
def test_corrupt_cache_is_ignored_with_a_warning(content, warnings):
    key = store.cache_key("Some GPU", "driver 1", {}, SHAPE)
    store.save_cached(key, _plan()).write_text(content(key))
    assert store.load_cached(key) is None
    assert any("corrupt" in w for w in warnings)


def test_first_use_measures_once_then_reads_the_cache(monkeypatch):
    calls = []

    def measure(shape, dtype):
        calls.append(shape)
        return _plan()

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Unmeasured GPU")
    monkeypatch.setattr("vllm_mirage.tuning.measure.measure_plan", measure)
    monkeypatch.setattr(tuning, "driver_version", lambda: "driver 1")
    first = tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=16)
    second = tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=16)
    assert len(calls) == 1 and second.source.startswith("measured on this machine")
    assert first.linear == second.linear and second.megakernel_max_batch == 0
    # A driver update invalidates the measurement: measured again, and the cache replaced.
    monkeypatch.setattr(tuning, "driver_version", lambda: "driver 2")
    tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=16)
    tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=16)
    assert len(calls) == 2


def test_shipped_table_wins_and_the_megakernel_limit_caps_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr("vllm_mirage.tuning.measure.measure_plan", lambda *a: pytest.fail("measured"))
    plan = tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=4)
    assert plan.source == "shipped table for NVIDIA H100 80GB HBM3" and plan.megakernel_max_batch == 4


def test_plan_override(tmp_path, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan(megakernel=2).to_dict()))
    monkeypatch.setenv(store.PLAN_ENV, str(path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    plan = tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=16)
    assert plan.megakernel_max_batch == 2 and plan.source == f"{store.PLAN_ENV}={path}"
    path.write_text("{}")
    with pytest.raises(ValueError, match=store.PLAN_ENV):
        tuning.decode_plan(SHAPE, torch.bfloat16, megakernel_limit=16)


@pytest.mark.parametrize("name", ["nvidia_h100_80gb_hbm3", "nvidia_h200"])
def test_every_shipped_decision_cites_result_files_that_exist(name):
    """A shipped table's choices stand on measurements: each shape's notes name the results behind its fused and
    megakernel limits (and launch settings, where it has any), and those are committed (a renamed or dropped folder
    fails here)."""
    table = Path(tuning.__file__).parents[1] / "data" / "tuning" / f"{name}.json"
    root = table.parents[3]
    for key, entry in json.loads(table.read_text())["shapes"].items():
        notes = entry["notes"]
        for limit in [k for k in ("fused_max_tokens", "megakernel_max_batch", "megakernel_launch") if k in entry]:
            cited = [p.rstrip(".,:;") for p in re.findall(r"benchmarks/results/[\w./-]+", notes[limit])]
            assert cited, f"{table.name} {key}: {limit} cites no result"
            for path in cited:
                assert (root / path).exists(), f"{table.name} {key}: {path} is not in the repository"
