"""Megakernel decode: a whole Qwen3 decode step in one persistent Triton launch.

``graph`` lowers a step into tile tasks with stage counters, ``kernel`` runs them with one worker per
SM, ``reference`` holds the layerwise PyTorch step and a CPU executor of the same graph, ``bridge`` feeds
it from vLLM's forward context. How it works and what was measured: docs/design.md.
"""

from vllm_mirage.megakernel.graph import DecodeShape, Task, TaskGraph, build_task_graph
from vllm_mirage.megakernel.state import DecodeBatch, DecodeBuffers, DecodeWeights

__all__ = ["DecodeBatch", "DecodeBuffers", "DecodeShape", "DecodeWeights", "Task", "TaskGraph", "build_task_graph"]
