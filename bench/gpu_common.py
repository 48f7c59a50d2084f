"""One timing methodology for every GPU bench (bench/gpu_*.py).

* ``graph_time_us(fn)``: warm up, capture ``fn`` in a CUDA graph, time graph replays with CUDA events
  (``triton.testing.do_bench``), median of the repeats; decode steps run under graphs in serving engines, so launch
  overhead is excluded. Falls back to eager timing (said in the output) when capture fails.
* ``pick(configs, make)``: a configuration is chosen on its own measurement, then the chosen one is timed again
  for the number that is reported (no best-of-many bias).
* ``read_bandwidth_gbs()``: the reference, measured in the same run: a large device-to-device copy counted as
  bytes *read* / time (the read side of the copy; writes are not counted).
* Bytes of a kernel = everything it reads and writes (cache, queries, split partials, outputs).
* ``environment()``: device, torch/triton versions, date, commit, for the log header.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from collections.abc import Callable
from typing import Any

import torch


def graph_time_us(fn: Callable[[], Any], rep_ms: int = 200) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph (eager when capture fails)."""
    import triton.testing

    from kvtool.runtime.graphs import capture_graph

    fn()
    torch.cuda.synchronize()
    try:
        graph, _ = capture_graph(fn)
        run = graph.replay
    except Exception as exc:  # noqa: BLE001
        print(f"(CUDA graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)", flush=True)
        run = fn
    return triton.testing.do_bench(run, warmup=25, rep=rep_ms, return_mode="median") * 1e3


def pick(configs: list[Any], make: Callable[[Any], Callable[[], Any]]) -> tuple[Any, float]:
    """Choose the fastest of ``configs`` on one measurement, then time the choice again: (config, us)."""
    trial = {i: graph_time_us(make(c), rep_ms=50) for i, c in enumerate(configs)}
    best = configs[min(trial, key=trial.get)]
    return best, graph_time_us(make(best))


def read_bandwidth_gbs(nbytes: int = 4 << 30) -> float:
    """Read bandwidth of a large device-to-device copy: bytes read / time (GB/s). Timed eagerly: one large kernel has
    no launch overhead to hide, and a graph-replayed copy measured 1.5x slower on an H200 (2026-11-23)."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return nbytes / (ms * 1e-3) / 1e9


def environment() -> str:
    """One line: device, versions, date, commit."""
    import triton

    commit = os.environ.get("KVTOOL_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip() or "unknown"
        except OSError:
            commit = "unknown"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"device {name}; torch {torch.__version__}; triton {triton.__version__}; "
            f"date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; kernels {kernels_digest()}")


def kernels_digest() -> str:
    """Short SHA-256 of kernels/*.py as run: names the kernel code even where the device copy's git is stale."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for f in sorted((Path(__file__).resolve().parent.parent / "kernels").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The baseline: PyTorch SDPA on a BF16 GQA cache (cuDNN where it is chosen), q [B, H, d], k/v [B, G, S, d]."""
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
