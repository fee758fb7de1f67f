"""The arithmetic of the host-side tools in ``benchmarks/`` on synthetic steps with known answers."""

import gzip
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Event:
    """A CUDA event that completed at ``t`` seconds: ``elapsed_time`` in ms, as torch's."""

    def __init__(self, t):
        self.t = t

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_host_phases_splits_a_period_into_its_phases():
    hp = _load("host_phases")
    log, events = [], []
    # A 140-token prefill, then ten decode steps of batch 2, one every 2 ms. Each step: schedule 0.1 ms,
    # execute_model 0.4 (a 0.1 ms collection in it), sample_tokens 0.2, a wait, update 0.1, then 0.8 ms
    # outside step_fn. The GPU runs each step's work for 1 ms from 0.1 ms after execute_model starts.
    log += [("schedule", 0.0, 0.0001, None), ("execute_model", 0.0001, 0.0051, 140)]
    events.append([_Event(0.0001), _Event(0.008)])
    log += [("sample_tokens", 0.0051, 0.0053, None), ("step_fn", 0.0, 0.0103, None)]
    t = 0.011
    for _ in range(10):
        log += [("schedule", t, t + 0.0001, None), ("execute_model", t + 0.0001, t + 0.0005, 2)]
        events.append([_Event(t + 0.0002), _Event(t + 0.0012)])
        log += [("sample_tokens", t + 0.0005, t + 0.0007, None), ("update_from_output", t + 0.001, t + 0.0011, None),
                ("step_fn", t, t + 0.0012, None), ("gc", t + 0.0002, t + 0.0003, None)]  # inside execute_model
        t += 0.002
    per = {k: statistics.median(v) for k, v in hp.phases(log, events).items()}
    assert per["period_us"] == pytest.approx(2000)
    assert per["execute_model_us"] == pytest.approx(400) and per["sample_tokens_us"] == pytest.approx(200)
    # 1.2 ms in step_fn less 0.8 ms of phases; the collection overlaps execute_model and is not taken off again
    assert per["rest_of_step_fn_us"] == pytest.approx(400) and per["gc_us"] == pytest.approx(100)
    assert per["outside_step_fn_us"] == pytest.approx(800)
    assert per["gpu_span_us"] == pytest.approx(1000) and per["gpu_gap_us"] == pytest.approx(1000)
    assert per["prefill_execute_model_us"] == pytest.approx(5000)
    assert len(hp.phases(log, events)["period_us"]) == 9


def test_host_phases_splits_the_first_token_call_along_one_clock():
    hp = _load("host_phases")
    # generate() at 10.000 s; the engine core stamps its first schedule at 10.004, prefills (execute_model
    # 3 ms, the GPU busy 2.5 ms of it), samples, updates, and stamps its last at 10.009; a collection
    # pauses it 1 ms inside execute_model; generate() returns at 10.012.
    log = [("schedule", 10.004, 10.0042, None), ("execute_model", 10.0042, 10.0072, 140),
           ("gc", 10.005, 10.006, None), ("sample_tokens", 10.0072, 10.0075, None),
           ("update_from_output", 10.0085, 10.009, None), ("step_fn", 10.004, 10.009, None)]
    events = [[_Event(0.0), _Event(0.0025)]]
    call = hp.call_totals(log, events)
    assert (call["first"], call["last"], call["steps"]) == (10.004, 10.009, 1)
    assert call["gpu_span_us"] == pytest.approx(2500) and call["gc_us"] == pytest.approx(1000)
    split = hp.ttft_split(10.0, 10.012, [call])
    assert split["ttft_us"] == pytest.approx(12000)
    assert split["arrival_us"] == pytest.approx(4000) and split["return_us"] == pytest.approx(3000)
    assert split["engine_us"] == pytest.approx(5000) and split["engine_execute_model_us"] == pytest.approx(3000)
    assert split["engine_steps"] == 1
    # The engine core's last step may end after generate() returned: the engine span stops at the return.
    late = hp.ttft_split(10.0, 10.008, [call])
    assert late["engine_us"] == pytest.approx(4000) and late["return_us"] == 0


def test_host_timeline_reads_a_host_bound_trace(tmp_path):
    ht = _load("host_timeline")
    events = []
    gpu_free = 0
    for step in range(12):  # the host launches every 2 ms; the graph runs 1 ms as soon as it can
        t = 2000 * step
        events.append({"ph": "X", "cat": "user_annotation", "name": "execute_context_0(0)_generation_2(2)",
                       "ts": t, "dur": 300})
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t + 100, "dur": 50,
                       "args": {"correlation": step}})
        start = max(t + 155, gpu_free)
        events.append({"ph": "X", "cat": "kernel", "name": "k", "ts": start, "dur": 1000,
                       "args": {"correlation": step}})
        gpu_free = start + 1000
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaEventSynchronize", "ts": t + 400, "dur": 200})
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    figures = ht.analyse(ht.load_events(path))
    assert figures["batch_sizes"] == [2] and figures["decode_steps"] == 7  # 11 periods, 2 cut at each end
    assert figures["median_period_us"] == 2000 and figures["median_gpu_busy_us"] == 1000
    assert figures["median_launch_lead_us"] == 5 and figures["median_host_wait_us"] == 200
