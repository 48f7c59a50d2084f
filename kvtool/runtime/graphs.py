"""CUDA-graph capture of a step (a decode step over a static-shape cache): warm up on a side stream, capture."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def capture_graph(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, output of the captured call): ``graph.replay()`` reruns ``fn``'s kernels on the same buffers and
    rewrites that output in place. ``fn`` runs once on a side stream first (allocator and autotuning warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
