"""StatsStore: per-layer float64 second-moment sums with token counts; save, load, merge, all-reduce.

Statistic names (per decoder layer ``i``; all uncentered sums ``Σ xᵀx`` over calibration tokens):

=========  ==========================  =================================================================
name       shape                       what ``x`` is
=========  ==========================  =================================================================
attn_in    [D, D]                      input of q/k/v_proj (after ``input_layernorm``)
q          [G, d, d]                   query heads of each KV group, after q_norm and RoPE, summed over
                                       the group's heads (so ``sum / count`` is Σ_h E[q_h q_hᵀ])
k          [G, d, d]                   keys per KV head, after k_norm and RoPE
v          [G, d, d]                   values per KV head
o_in       [H*d, H*d]                  input of o_proj
mlp_in     [D, D]                      input of gate/up_proj (after ``post_attention_layernorm``)
down_in    [I, I]                      input of down_proj (large; only when asked)
=========  ==========================  =================================================================

On disk: ``stats.safetensors`` (keys ``layers.{i}.{name}``, float64) and ``manifest.json`` (model identity
and hash, dataset, samples, seq-len, tokens, per-statistic counts, kvtool version). Every sum is symmetric, so the
file holds each one's upper triangle, rows in order (row ``i``: columns ``i..n-1``), as ``[..., n(n+1)/2]``; the
header's metadata says so (``"layout": "upper-triangle"``) and :func:`unpack_upper` restores ``[..., n, n]``.
Folders written before 2026-12-01 hold whole matrices (no ``layout``) and still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from kvtool.checkpoint import file_sha256
from kvtool.errors import KvtoolError

ALL_STATS = ("attn_in", "q", "k", "v", "o_in", "mlp_in", "down_in")
DEFAULT_STATS = ("attn_in", "q", "k", "v", "o_in", "mlp_in")
TENSORS_FILE = "stats.safetensors"
MANIFEST_FILE = "manifest.json"


def recorded_dataset(directory: str | Path) -> dict[str, Any] | None:
    """The ``dataset`` block a statistics folder recorded (which text and windows it was collected on), or None
    when the folder has no readable manifest (loading it reports the problem)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    block = manifest.get("dataset") if isinstance(manifest, dict) else None
    return block if isinstance(block, dict) else None


def parse_stats(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate a comma-separated list of statistic names (None -> the default set)."""
    if spec is None:
        return DEFAULT_STATS
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in ALL_STATS]
    if unknown or not names:
        raise KvtoolError(f"unknown statistics {', '.join(unknown) or '(none given)'}: "
                          f"choose from {','.join(ALL_STATS)}")
    return tuple(n for n in ALL_STATS if n in names)


def gram_fp32(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of bf16/fp16 rows ``x`` [n, d] (or batched [b, n, d] -> [b, d, d]) with float32 accumulation."""
    return gram_fp32_pair(x, x)


def gram_fp32_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀb`` of bf16/fp16 rows (2-D or batched) with float32 accumulation.

    On a GPU: a half-precision GEMM with a float32 output (products of bf16/fp16 values are exact in float32; only
    the accumulation rounds), else the same numbers through TF32 (bf16 values are exact in TF32)."""
    at = a.transpose(-1, -2)
    if a.is_cuda:
        try:
            return (torch.bmm if a.ndim == 3 else torch.mm)(at, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # torch without out_dtype for this backend
            pass
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return at.float() @ b.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


GRAM_BLOCK = 192  # column block of gram_f64: only the blocks on and above the diagonal are multiplied


def gram_f64(x: torch.Tensor) -> torch.Tensor:
    """``xᵀx`` of float64 rows ``x`` [n, d], multiplying only the column blocks on and above the diagonal and
    mirroring the rest (the result is exactly symmetric; 1.4-1.6x faster than one GEMM at d = 576-1536 on the CPU,
    entries equal to the full product's to rounding)."""
    d = x.shape[1]
    if d < 2 * GRAM_BLOCK:
        g = x.T @ x
        return torch.triu(g) + torch.triu(g, 1).T
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start in range(0, d, GRAM_BLOCK):
        out[start:start + GRAM_BLOCK, start:] = x[:, start:start + GRAM_BLOCK].T @ x[:, start:]  # block row
    mirror_upper(out, GRAM_BLOCK)
    return out


WIDE_GRAM_BLOCK = 2048  # column block of the tensor-core path for statistics at least twice as wide (down_in)


def add_upper_gram(total: torch.Tensor, x: torch.Tensor, block: int) -> None:
    """Add the column blocks on and above the diagonal of ``xᵀx`` (bf16/fp16 rows ``x`` [n, d], float32 products as
    :func:`gram_fp32`) into the float64 ``total`` [d, d] in place; blocks below the diagonal are left as they are
    (:func:`mirror_upper` fills them). At d = 14336 and block 2048: 28 of 49 blocks, 57% of the FLOPs, and no
    float64 temporary of the whole product."""
    d = x.shape[1]
    for start in range(0, d, block):
        stop = min(start + block, d)
        total[start:stop, start:] += gram_fp32_pair(x[:, start:stop], x[:, start:])


F64_ROW_CHUNK = 1024  # rows converted to float64 at a time by add_upper_f64 (bounds its temporary)


def add_upper_f64(total: torch.Tensor, x: torch.Tensor, block: int) -> None:
    """Add the column blocks on and above the diagonal of ``xᵀx`` into the float64 ``total`` in place, products and
    accumulation in float64 (``addmm_`` into the sum: no temporary of the product), rows converted to float64
    ``F64_ROW_CHUNK`` at a time; blocks below the diagonal are left as they are (:func:`mirror_upper`)."""
    d = x.shape[1]
    for r in range(0, x.shape[0], F64_ROW_CHUNK):
        chunk = x[r:r + F64_ROW_CHUNK].to(torch.float64)
        for start in range(0, d, block):
            stop = min(start + block, d)
            total[start:stop, start:].addmm_(chunk[:, start:stop].T, chunk[:, start:])


def mirror_upper(total: torch.Tensor, block: int) -> None:
    """Make ``total`` exactly symmetric from its upper triangle (in place), block row by block row: each diagonal
    block (a whole product, whose two triangles can differ in the last bit) takes the mirror of its upper triangle,
    and the blocks above the diagonal are copied onto those below."""
    d = total.shape[0]
    for start in range(0, d, block):
        stop = min(start + block, d)
        diagonal = total[start:stop, start:stop]
        diagonal.copy_(symmetrize_upper(diagonal))
        total[stop:, start:stop] = total[start:stop, stop:].T


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialized ordinary host memory for a sum; large ones are backed by transparent huge pages where the
    kernel allows it (``madvise`` mode): the first touch of a 1.5 GB sum then faults 2 MB pages instead of 4 KB
    ones (the drain of a down_in sum on an H200 host: 174 -> 82 ms)."""
    import mmap

    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 25 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def file_order(key: tuple[int, str]) -> tuple[int, int, str]:
    """The order of (layer, statistic) sums in a statistics file: layers ascending, statistics in ALL_STATS order."""
    layer, name = key
    return layer, ALL_STATS.index(name) if name in ALL_STATS else len(ALL_STATS), name


LAYOUT = "upper-triangle"  # how stats.safetensors stores each sum (its header's __metadata__["layout"])


def symmetrize_upper(g: torch.Tensor) -> torch.Tensor:
    """``[..., n, n]`` -> the symmetric matrix with ``g``'s upper triangle (diagonal included)."""
    return torch.triu(g) + torch.triu(g, 1).mT


_UPPER_INDEX: dict[tuple[int, str], torch.Tensor] = {}


def upper_index(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Flat indices (int64) of the upper triangle of an ``n x n`` matrix, rows in order; cached per (n, device)."""
    key = (n, str(torch.device(device)))
    if key not in _UPPER_INDEX:
        _UPPER_INDEX[key] = torch.ones(n, n, dtype=torch.bool, device=device).triu().flatten().nonzero().squeeze(1)
    return _UPPER_INDEX[key]


def packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape on disk of a sum of ``shape`` [..., n, n]: [..., n(n+1)/2]."""
    n = shape[-1]
    return (*shape[:-2], n * (n + 1) // 2)


def pack_upper(t: torch.Tensor) -> torch.Tensor:
    """``[..., n, n]`` -> ``[..., n(n+1)/2]``: the upper triangle, rows in order (an index gather on ``t``'s device,
    no host synchronization: on a GPU it runs on the current stream)."""
    n = t.shape[-1]
    if t.ndim < 2 or t.shape[-2] != n:
        raise ValueError(f"a sum of shape {tuple(t.shape)} is not square")
    flat = t.reshape(*t.shape[:-2], n * n)
    return flat.index_select(-1, upper_index(n, t.device))


def unpack_upper(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_upper`: ``[..., n(n+1)/2]`` -> the symmetric ``[..., n, n]``."""
    import math

    k = p.shape[-1]
    n = (math.isqrt(8 * k + 1) - 1) // 2
    if n * (n + 1) // 2 != k:
        raise ValueError(f"{k} values are not the upper triangle of a square matrix")
    out = p.new_zeros(*p.shape[:-1], n * n)
    out.index_copy_(-1, upper_index(n, p.device), p)
    out = out.view(*p.shape[:-1], n, n)
    return out + torch.triu(out, 1).mT


DIGEST_CHUNK = 1 << 24
DIGEST_LABEL = "sha256-{mib}MiB-chunks"


def tensors_digest(path: Path, chunk: int | None = None) -> str:
    """Digest of a statistics file (tens of GB with down_in): the sha256 of its chunks' sha256 digests (16 MiB
    chunks unless ``chunk`` says otherwise; the label names the size), in order, the chunks hashed on all cores
    (hashlib releases the GIL). One sha256 of the whole file ran at ~0.6 GB/s on an H200 host: 18 s for an 8B
    model's default statistics, after a 9.8 s pass."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = chunk or DIGEST_CHUNK
    if chunk % (1 << 20):
        raise ValueError("digest chunks are whole MiB")
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()

        def chunk_digest(i: int) -> bytes:
            return hashlib.sha256(os.pread(fd, chunk, i * chunk)).digest()

        chunks = max(1, -(-size // chunk))
        with ThreadPoolExecutor(max_workers=min(chunks, os.cpu_count() or 1)) as pool:
            digests = list(pool.map(chunk_digest, range(chunks)))
    return DIGEST_LABEL.format(mib=chunk >> 20) + ":" + hashlib.sha256(b"".join(digests)).hexdigest()


def digest_matches(path: Path, recorded: str) -> bool:
    """Whether ``path`` has the digest a manifest recorded, hashed with the chunk size its label names."""
    import re

    label = re.fullmatch(r"sha256-(\d+)MiB-chunks:[0-9a-f]{64}", recorded)
    return bool(label) and int(label.group(1)) > 0 and tensors_digest(path, int(label.group(1)) << 20) == recorded


def open_sums_file(path: Path, plan: list[tuple[int, str, tuple[int, ...]]]) -> SumsFile:
    """The statistics file for ``plan`` ((layer, statistic, shape of the sum) in file order): each sum stored as its
    upper triangle (``packed_shape``), the header's metadata naming the layout."""
    return SumsFile(path, [(f"layers.{i}.{n}", packed_shape(shape)) for i, n, shape in plan], {"layout": LAYOUT})


class SumsFile:
    """A ``stats.safetensors`` written while calibration runs: each completed sum is written (then the caller frees
    it), so host memory holds one layer's sums, not all of them. The caller gives the ``plan`` up front (every
    tensor's name and shape, in the order they will be written: layer by layer, statistics in ``ALL_STATS`` order),
    so the header is written first, exact, and a sum the plan does not name is an error rather than a file whose
    header lies. Each sum lands at its planned offset in 64 MiB pieces written by several threads (``os.pwrite``
    releases the GIL): one thread filling fresh page-cache pages is what a 1.5 GB down_in sum would otherwise wait
    on."""

    PIECE = 1 << 26

    def __init__(self, path: str | Path, plan: list[tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        import threading

        self.path = Path(path)
        self.plan = [(name, tuple(int(d) for d in shape)) for name, shape in plan]
        entries, offset = {}, 0
        for name, shape in self.plan:
            nbytes = 8 * torch.Size(shape).numel()
            entries[name] = {"dtype": "F64", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header = json.dumps({"__metadata__": {"format": "pt", **(metadata or {})}, **entries},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned (safetensors pads with spaces too)
        self.data_start = 8 + len(header)
        self.offsets = [entries[name]["data_offsets"][0] for name, _ in self.plan]
        self.next = 0  # index into plan of the next tensor to write
        self.lock = threading.Lock()
        self._pool: Any = None
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(struct.pack("<Q", len(header)) + header, 0)

    def _pwrite(self, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu", torch.float64).contiguous()
        with self.lock:
            if self.next >= len(self.plan) or self.plan[self.next] != (name, tuple(t.shape)):
                expected = self.plan[self.next] if self.next < len(self.plan) else "nothing"
                raise KvtoolError(f"internal error: statistics file expected {expected}, got {name} "
                                  f"{tuple(t.shape)}")
            view = memoryview(t.numpy()).cast("B")
            start = self.data_start + self.offsets[self.next]
            pieces = range(0, len(view), self.PIECE)
            if len(pieces) <= 1:
                self._pwrite(view, start)
            else:
                if self._pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                    thread_name_prefix="kvtool-stats-write")
                list(self._pool.map(lambda i: self._pwrite(view[i:i + self.PIECE], start + i), pieces))
            self.next += 1

    def close(self) -> None:
        """Check that every planned tensor was written and close the file."""
        try:
            if self.next != len(self.plan):
                raise KvtoolError(f"internal error: statistics file got {self.next} of {len(self.plan)} tensors")
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            os.close(self.fd)


class StatsStore:
    """Float64 sums of xᵀx and token counts per (layer, statistic)."""

    def __init__(self, meta: dict[str, Any] | None = None, exact: bool = True):
        self.meta: dict[str, Any] = dict(meta or {})
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}
        # exact=False: per-batch Gram products of bf16/fp16 activations in float32 (TF32 tensor cores on a GPU:
        # bf16 values are exact in TF32, so products are exact and only the fp32 accumulation inside one batch
        # rounds, relative error <~ sqrt(rows) * 2^-24); sums across batches stay float64
        self.exact = exact
        # asynchronous offload: up to two reusable pinned staging buffers per (statistic, shape); each layer's
        # device->pinned copies are enqueued on the GPU stream with an event, and a background thread waits for
        # the event and copies pinned -> ordinary host memory, so neither step blocks the next layer's launches
        self._free: dict[tuple[str, tuple[int, ...]], list[torch.Tensor]] = {}
        self._allocated: dict[tuple[str, tuple[int, ...]], int] = {}
        self._pending: list[Any] = []  # futures of the background drains, oldest first
        self._executor: Any = None
        # under torch.distributed: sum each layer's sums onto rank 0 when the layer offloads (on the GPU under NCCL,
        # overlapping the next layer); the other ranks then drop them (no copy to their hosts)
        self.reduce_each_layer = False
        self._reduced: set[tuple[int, str]] = set()
        # wide statistics on the tensor-core path accumulate only the blocks on and above the diagonal until the
        # layer offloads (or the sums are read); then the rest is mirrored
        self.wide_block = WIDE_GRAM_BLOCK
        self._upper: dict[tuple[int, str], int] = {}  # key -> column block
        # write_to(): completed layers' sums go to a statistics file and leave memory (counts stay)
        self.sink: SumsFile | None = None
        self._written: set[tuple[int, str]] = set()
        self._copy_stream: Any = None

    # ------------------------------------------------------------------ accumulation
    def add_gram(self, layer: int, name: str, gram: torch.Tensor, tokens: int) -> None:
        """Add a precomputed Gram matrix (``xᵀx`` over ``tokens`` rows), accumulated in float64.

        The Gram is made exactly symmetric from its upper triangle first (a GEMM's two triangles can differ in the
        last bit; the statistics file keeps one triangle, so sums read back equal the sums in memory). Sums stay on
        the device of the first Gram added (no per-batch device-to-host copies); call :meth:`offload` to move them
        to the CPU.
        """
        key = (layer, name)
        gram = symmetrize_upper(gram.detach().to(torch.float64))  # a new tensor: it can become the sum
        self._complete(key)
        if key in self.sums:
            self.sums[key] += gram.to(self.sums[key].device)
            self.counts[key] += tokens
        else:
            self.sums[key] = gram
            self.counts[key] = tokens

    def add(self, layer: int, name: str, x: torch.Tensor) -> None:
        """Add rows of ``x`` (..., n): accumulates ``xᵀx`` in float64 (see ``exact``)."""
        x = x.reshape(-1, x.shape[-1])
        key = (layer, name)
        tensor_cores = not self.exact and x.dtype in (torch.bfloat16, torch.float16)
        block = self.wide_block if tensor_cores else GRAM_BLOCK
        if x.shape[1] >= 2 * block and (key not in self.sums or key in self._upper):
            # wide statistics: the blocks on and above the diagonal, accumulated in place (mirrored when read)
            if key not in self.sums:
                self.sums[key] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.counts[key] = 0
                self._upper[key] = block
            (add_upper_gram if tensor_cores else add_upper_f64)(self.sums[key], x, block)
            self.counts[key] += x.shape[0]
            return
        if tensor_cores:
            gram = gram_fp32(x)
        else:
            x = x.to(torch.float64)
            gram = gram_f64(x)
        self.add_gram(layer, name, gram, x.shape[0])

    def offload(self, layer: int | None = None) -> None:
        """Move the sums (of one layer, or all) to the CPU. For one layer from a GPU: asynchronously, through pinned
        staging buffers and a background thread, overlapping the next layer's work (reads wait for it)."""
        for key in sorted(self.sums, key=file_order):  # the statistics file's order
            if layer is None or key[0] == layer:
                if self.sink is not None and layer is not None:
                    self._upper.pop(key, None)  # written packed: the upper blocks already hold the triangle
                else:
                    self._complete(key)
                t = self.sums[key]
                if self.reduce_each_layer and layer is not None:
                    import torch.distributed as dist

                    dist.reduce(t, dst=0)  # on NCCL's stream for a GPU sum; the copy below is ordered after it
                    self._reduced.add(key)
                    if dist.get_rank() != 0:
                        del self.sums[key]  # its part is in rank 0's sum now
                        continue
                if not t.is_cuda:
                    if self.sink is not None and layer is not None:
                        self._write(key, t)
                    continue
                if layer is None:
                    self.synchronize()
                    self.sums[key] = t.cpu()
                    continue
                if self.sink is not None:  # only the upper triangle travels and is written (half the bytes)
                    t = pack_upper(t)
                staging = self._staging_buffer(key[1], tuple(t.shape), t.dtype)
                # the device -> pinned copy runs on its own stream (the copy engine), after the work that
                # produced the sum, beside the next layer's kernels
                if self._copy_stream is None:
                    self._copy_stream = torch.cuda.Stream(device=t.device)
                self._copy_stream.wait_stream(torch.cuda.current_stream(t.device))
                with torch.cuda.stream(self._copy_stream):
                    staging.copy_(t, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._copy_stream)
                if self._executor is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtool-stats-drain")
                self._pending.append(self._executor.submit(self._drain, key, t, staging, done))

    def _staging_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A free pinned buffer for (name, shape): a new one while fewer than two exist, else the next to drain."""
        slot = (name, shape)
        while not self._free.get(slot):
            if self._allocated.get(slot, 0) < 2:
                self._allocated[slot] = self._allocated.get(slot, 0) + 1
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            self._pending.pop(0).result()  # oldest drain first: it returns its buffer
        return self._free[slot].pop()

    def _drain(self, key: tuple[int, str], device_sum: torch.Tensor, staging: torch.Tensor, done: Any) -> None:
        done.synchronize()
        if self.sink is not None:  # straight from the pinned buffer (the packed sum) into the statistics file
            self._write(key, staging, packed=True)
        else:
            self.sums[key] = host_empty(tuple(staging.shape), staging.dtype).copy_(staging)
        del device_sum  # the device tensor could be freed only once its copy had finished
        self._free.setdefault((key[1], tuple(staging.shape)), []).append(staging)

    def _write(self, key: tuple[int, str], t: torch.Tensor, packed: bool = False) -> None:
        self.sink.write(f"layers.{key[0]}.{key[1]}", t if packed else pack_upper(t))
        self.sums.pop(key, None)
        self._written.add(key)

    def write_to(self, directory: str | Path, plan: list[tuple[int, str, tuple[int, ...]]]) -> None:
        """Write each layer's sums into ``directory``'s statistics file as the layer completes and free them (peak
        host memory: one layer's sums); :meth:`save` into the same folder finishes the file. ``plan``: every
        (layer, statistic, shape) that will be written, layers ascending, statistics in ``ALL_STATS`` order (the
        order :meth:`offload` hands them over). Single process only (under torch.distributed the sums are reduced
        onto rank 0, which writes them at the end)."""
        self.sink = open_sums_file(Path(directory) / TENSORS_FILE, plan)

    def _complete(self, key: tuple[int, str]) -> None:
        """Mirror a wide sum kept as its blocks on and above the diagonal into the whole symmetric matrix."""
        if key in self._upper:
            mirror_upper(self.sums[key], self._upper.pop(key))

    def synchronize(self) -> None:
        """Finish asynchronous copies to the CPU (the sums then live in ordinary host memory)."""
        for key in list(self._upper):
            self._complete(key)
        while self._pending:
            self._pending.pop(0).result()

    # ------------------------------------------------------------------ reading
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.counts})

    def names(self) -> list[str]:
        present = {n for _, n in self.counts}
        return [n for n in ALL_STATS if n in present]

    def has(self, layer: int, name: str) -> bool:
        return (layer, name) in self.counts

    def sum(self, layer: int, name: str) -> torch.Tensor:
        """The raw float64 sum Σ xᵀx."""
        self.synchronize()
        if (layer, name) in self._written:
            raise KvtoolError(f"statistic {name!r} of layer {layer} was written to disk: load the statistics folder")
        if (layer, name) not in self.sums:
            raise KvtoolError(f"statistic {name!r} of layer {layer} is missing: recalibrate with --stats {name}")
        return self.sums[(layer, name)]

    def count(self, layer: int, name: str) -> int:
        self.sum(layer, name)
        return self.counts[(layer, name)]

    def second_moment(self, layer: int, name: str) -> torch.Tensor:
        """Σ xᵀx / tokens (float64): the uncentered second moment the methods use."""
        return self.sum(layer, name) / self.count(layer, name)

    def require(self, names: tuple[str, ...] | list[str], num_layers: int, model_hash: str | None = None) -> None:
        """Raise a clear error unless every layer has every named statistic (and the model hash matches)."""
        if model_hash is not None:
            have = (self.meta.get("model") or {}).get("hash")
            if have is not None and have != model_hash:
                raise KvtoolError(f"statistics were collected on a different model (hash {have[:19]}…, this model "
                                  f"{model_hash[:19]}…): recalibrate with `kvtool calibrate` on this model")
        for name in names:
            missing = [i for i in range(num_layers) if (i, name) not in self.counts]
            if missing:
                raise KvtoolError(f"statistic {name!r} missing for {len(missing)} of {num_layers} layers: "
                                  f"recalibrate with --statistics including {name}")

    # ------------------------------------------------------------------ combining
    def merge(self, other: StatsStore) -> StatsStore:
        """Add another store's sums and counts into this one (e.g. two calibration runs)."""
        other.synchronize()
        for (layer, name), s in other.sums.items():
            self.add_gram(layer, name, s, other.counts[(layer, name)])
        return self

    def all_reduce(self) -> None:
        """Sum every statistic and count over torch.distributed ranks (in place, same order on all ranks). Sums
        already reduced layer by layer (``reduce_each_layer``) are only counted: rank 0 holds them."""
        self.synchronize()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        for key in sorted(self.counts):
            if key not in self._reduced:
                t = self.sums[key].to(device)
                dist.all_reduce(t)
                self.sums[key] = t.cpu()
            c = torch.tensor([self.counts[key]], dtype=torch.int64, device=device)
            dist.all_reduce(c)
            self.counts[key] = int(c.item())

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> None:
        """Write ``stats.safetensors`` + ``manifest.json`` into ``directory`` (use an atomic folder)."""
        self.synchronize()
        if not (self.meta.get("model") or {}).get("hash"):
            raise KvtoolError("statistics without a model hash cannot be saved: stamp store.meta['model'] "
                              "(kvtool.calib.collect.calibrate does)")
        directory = Path(directory)
        if self.sink is not None:
            if self.sink.path != directory / TENSORS_FILE:
                raise KvtoolError(f"internal error: statistics are being written to {self.sink.path.parent}, "
                                  f"not {directory}")
            for key in sorted(self.sums, key=file_order):  # sums never offloaded by layer (none in a normal run)
                self._write(key, self.sums[key])
            self.sink.close()
            self.sink = None
        else:
            keys = sorted(self.sums, key=file_order)
            sink = open_sums_file(directory / TENSORS_FILE, [(i, n, tuple(self.sums[(i, n)].shape)) for i, n in keys])
            try:
                for i, n in keys:
                    sink.write(f"layers.{i}.{n}", pack_upper(self.sums[(i, n)].cpu()))
            finally:
                sink.close()
        manifest = dict(self.meta)
        manifest["kind"] = "kvtool-stats"
        manifest["counts"] = {f"layers.{layer}.{name}": c for (layer, name), c in sorted(self.counts.items())}
        manifest["stats"] = self.names()
        manifest["layers"] = self.layers()
        manifest["tensors_digest"] = tensors_digest(directory / TENSORS_FILE)
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> StatsStore:
        """Read a statistics folder written by :meth:`save`; unreadable or inconsistent files raise KvtoolError."""
        from safetensors import safe_open

        directory = Path(directory).expanduser()
        manifest_path, tensors_path = directory / MANIFEST_FILE, directory / TENSORS_FILE
        if not directory.is_dir() or not manifest_path.is_file() or not tensors_path.is_file():
            raise KvtoolError(f"{directory} is not a statistics folder (needs {MANIFEST_FILE} and {TENSORS_FILE}): "
                              "run `kvtool calibrate MODEL -o DIR` first")
        try:
            manifest = json.loads(manifest_path.read_text())
            if "tensors_digest" in manifest:
                if not digest_matches(tensors_path, str(manifest["tensors_digest"])):
                    raise ValueError("checksum mismatch")
            elif ("tensors_sha256" in manifest  # whole-file sha256: folders written before 2026-12-01
                  and file_sha256(tensors_path).removeprefix("sha256:") != manifest["tensors_sha256"]):
                raise ValueError("checksum mismatch")
            if not (manifest.get("model") or {}).get("hash"):
                raise ValueError("no model hash")
            with safe_open(str(tensors_path), "pt") as f:  # one read of the header: layout, then the tensors
                layout = (f.metadata() or {}).get("layout")
                if layout in (None, LAYOUT):
                    tensors = {key: f.get_tensor(key) for key in f.keys()}
                    if layout == LAYOUT:
                        tensors = {key: unpack_upper(t) for key, t in tensors.items()}
        except Exception as exc:
            raise KvtoolError(f"cannot read statistics in {directory} ({type(exc).__name__}): "
                              "the files are damaged; recalibrate") from exc
        if layout not in (None, LAYOUT):
            raise KvtoolError(f"statistics in {directory} store their sums as {layout!r}, which this kvtool does not "
                              "read: recalibrate with this kvtool (or use the kvtool that wrote them)")
        counts = manifest.pop("counts", {})
        store = cls(manifest)
        for key, t in tensors.items():
            _, layer, name = key.split(".", 2)
            if key not in counts:
                raise KvtoolError(f"statistics in {directory} have no token count for {key}: recalibrate")
            if not torch.isfinite(t).all():
                raise KvtoolError(f"statistics in {directory} hold non-finite values ({key}): the model produced "
                                  "inf/NaN activations on the calibration text; check the model and recalibrate")
            store.sums[(int(layer), name)] = t.to(torch.float64)
            store.counts[(int(layer), name)] = int(counts[key])
        return store
