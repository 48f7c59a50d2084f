"""llama.cpp serving on the CPU: the original GGUF vs kvtool's MLA exports (needs llama-cpp-python; `make
engines-setup` builds it).

For each GGUF and context C: the KV cache bytes per token as llama.cpp allocates them (its own log line
``llama_kv_cache: size = ... MiB (cells, layers, seqs), K (f16): ..., V (f16): ...``, divided by its cells), the
prompt tokens/s of one sequence of C - steps random tokens (one llama_decode per n_batch tokens), and the decode
tokens/s at batch B (B sequences of that context each, their own cache streams: ``kv_unified = false``, the prompt's
cache copied to the other streams with ``llama_memory_seq_cp``, then ``steps`` decode calls of one token per
sequence). Batch 1 decodes sequence 0 alone; the stream is trimmed back to the prompt after each batch size.
Random token ids, seeded; the same threads for every model; the models run one after another at each context.

    python bench/llamacpp_serve.py --model original=out/orig-f16/model.gguf --model mla-0.5=out/ds05-gguf/model.gguf \\
        --contexts 2048,8192,32768 --batches 1,4 --json docs/results/llamacpp_serve_cpu_2026-12-04.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import re
import time
from pathlib import Path

import numpy as np

KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\)")


LOG: list[str] = []


@contextlib.contextmanager
def captured_log():
    """llama.cpp's log lines written inside the block (through llama_log_set), as a list with one string."""
    import llama_cpp as L

    @L.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        LOG.append(text.decode(errors="replace"))

    out: list[str] = []
    LOG.clear()
    L.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield out
    finally:
        out.append("".join(LOG))
        captured_log.keep = collect  # the C side keeps the pointer: keep the callback alive


class Engine:
    """One llama.cpp context over a GGUF: n_seq sequences of n_ctx_seq tokens each."""

    def __init__(self, gguf: str, n_ctx_seq: int, n_seq: int, threads: int, n_batch: int, flash_attn: str = "auto"):
        import llama_cpp as L

        self.L = L
        with captured_log() as log:
            mp = L.llama_model_default_params()
            self.model = L.llama_model_load_from_file(gguf.encode(), mp)
            cp = L.llama_context_default_params()
            cp.n_ctx = n_ctx_seq * n_seq
            cp.n_batch = n_batch
            cp.n_ubatch = min(512, n_batch)
            cp.n_seq_max = n_seq
            cp.kv_unified = False
            cp.n_threads = cp.n_threads_batch = threads
            cp.flash_attn_type = {"auto": -1, "off": 0, "on": 1}[flash_attn]
            self.ctx = L.llama_init_from_model(self.model, cp)
        self.log = log[0]
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {gguf}:\n{self.log[-2000:]}")
        m = KV_LINE.search(self.log)
        if m is None:
            raise RuntimeError(f"no llama_kv_cache size line in llama.cpp's log:\n{self.log[-2000:]}")
        mib, cells, layers, seqs = float(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(5))
        v_mib = re.search(r"V \([a-z0-9_]+\): +([\d.]+) MiB", self.log[m.start():])
        self.has_v = v_mib is not None and float(v_mib.group(1)) > 0
        self.kv_bytes_per_token = mib * 2**20 / (cells * seqs)
        self.kv_layers = layers
        self.flash_attn = "FLASH_ATTN_EXT" in self.log  # the graph's attention node (flash_attn = auto resolved)
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(max(n_batch, n_seq), 0, 1)
        self.vocab = L.llama_n_vocab(L.llama_model_get_vocab(self.model))

    def decode(self, tokens: list[int], pos0: int, seqs: list[int], logits_last: bool = True) -> None:
        """One llama_decode: ``tokens[i]`` of sequence ``seqs[i]`` (len 1 = the same for all) at pos0 + i, or, with
        several sequences, one token per sequence at pos0."""
        b = self.batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + (i if len(seqs) == 1 else 0)
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seqs[0] if len(seqs) == 1 else seqs[i]
            b.logits[i] = (i == n - 1) if len(seqs) == 1 else True
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def replicate_state(blob: bytes, n_cells: int, has_v: bool) -> bytes:
    """A one-sequence KV state (``llama_state_seq_get_data``: magic, seq id, n_stream, then per stream its cells (pos,
    n_seq_id = 1, seq id) and per-layer K rows, V rows or transposed V) with its cells repeated to ``n_cells`` at
    positions 0..n_cells-1: a long context without processing a long prompt (decode time does not depend on the
    cached values)."""
    import struct

    off = 0

    def take(fmt: str) -> tuple:
        nonlocal off
        vals = struct.unpack_from(fmt, blob, off)
        off += struct.calcsize(fmt)
        return vals

    def rows(count: int, width: int) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(blob, np.uint8, count * width, off).reshape(count, width)
        off += count * width
        return a

    magic, seq_id, n_stream = take("<IiI")  # llama_context's io magic and the source sequence, then the cache's
    out = [struct.pack("<IiI", magic, seq_id, n_stream)]
    for _ in range(n_stream):
        (cc,) = take("<I")
        if cc == 0:
            out.append(struct.pack("<I", 0))
            continue
        seq = None
        for i in range(cc):
            pos, n_seq = take("<iI")
            (seq,) = take("<i")
            if n_seq != 1 or pos != i:
                raise RuntimeError(f"expected one sequence at positions 0..n-1, cell {i}: pos {pos}, n_seq {n_seq}")
        out.append(struct.pack("<I", n_cells))
        cells = np.zeros(n_cells, dtype=[("pos", "<i4"), ("n_seq", "<u4"), ("seq", "<i4")])
        cells["pos"], cells["n_seq"], cells["seq"] = np.arange(n_cells), 1, seq
        out.append(cells.tobytes())
        v_trans, n_layer = take("<II")
        out.append(struct.pack("<II", v_trans, n_layer))
        for _ in range(n_layer):
            k_type, row = take("<iQ")
            out += [struct.pack("<iQ", k_type, row), np.resize(rows(cc, row), (n_cells, row)).tobytes()]
        for _ in range(n_layer if has_v else 0):
            if not v_trans:
                v_type, row = take("<iQ")
                out += [struct.pack("<iQ", v_type, row), np.resize(rows(cc, row), (n_cells, row)).tobytes()]
            else:
                v_type, el, n_embd = take("<iII")
                v = rows(n_embd, cc * el).reshape(n_embd, cc, el)
                reps = -(-n_cells // cc)
                out += [struct.pack("<iII", v_type, el, n_embd), np.tile(v, (1, reps, 1))[:, :n_cells].tobytes()]
    if off != len(blob):
        raise RuntimeError(f"state not fully parsed ({off} of {len(blob)} bytes)")
    return b"".join(out)


def measure(gguf: str, context: int, batches: list[int], steps: int, threads: int, n_batch: int,
            seed: int, max_prompt: int, flash_attn: str = "auto") -> list[dict]:
    """Rows (one per batch size) for one GGUF at one context: the prompt is processed once into sequence 0 of an
    engine with max(batches) streams; batch B decodes sequences 0..B-1 (the prompt's cache copied to the others).
    Above ``max_prompt`` tokens the cache is the first ``max_prompt`` tokens' repeated (:func:`replicate_state`)
    and no prompt speed is reported."""
    rng = np.random.default_rng(seed)
    eng = Engine(gguf, context, max(batches), threads, n_batch, flash_attn)
    n_prompt = context - steps
    prompt = rng.integers(100, eng.vocab - 100, size=min(n_prompt, max_prompt)).tolist()
    t0 = time.perf_counter()
    for s in range(0, len(prompt), n_batch):
        eng.decode(prompt[s:s + n_batch], s, [0])
    prompt_s = time.perf_counter() - t0
    prompt_tps = len(prompt) / prompt_s if len(prompt) == n_prompt else None
    if len(prompt) < n_prompt:
        L = eng.L
        size = L.llama_state_seq_get_size(eng.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        got = L.llama_state_seq_get_data(eng.ctx, buf, size, 0)
        state = replicate_state(bytes(buf)[:got], n_prompt, eng.has_v)
        new = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if L.llama_state_seq_set_data(eng.ctx, new, len(state), 0) == 0:
            raise RuntimeError("llama.cpp refused the replicated KV state")
        prompt = prompt * (-(-n_prompt // len(prompt)))
        prompt = prompt[:n_prompt]
    mem = eng.L.llama_get_memory(eng.ctx)
    copied = 1
    rows = []
    for batch in sorted(batches):
        for seq in range(copied, batch):
            eng.L.llama_memory_seq_cp(mem, 0, seq, -1, -1)
        copied = max(copied, batch)
        seqs = list(range(batch))
        eng.decode([int(rng.integers(100, 1000))] * batch, len(prompt), seqs)  # warm-up step (and the stream copy)
        t0 = time.perf_counter()
        for k in range(1, steps):
            eng.decode([int(rng.integers(100, 1000))] * batch, len(prompt) + k, seqs)
        step_s = (time.perf_counter() - t0) / (steps - 1)
        for seq in seqs:  # back to the prompt alone
            eng.L.llama_memory_seq_rm(mem, seq, len(prompt), -1)
        rows.append({"context": context, "batch": batch, "kv_bytes_per_token": eng.kv_bytes_per_token,
                     "kv_layers": eng.kv_layers, "prompt_tokens": len(prompt),
                     "prompt_tokens_per_s": prompt_tps, "cache_filled_from": min(n_prompt, max_prompt),
                     "decode_ms_per_step": 1000 * step_s,
                     "decode_tokens_per_s": batch / step_s, "flash_attn": eng.flash_attn})
        print(json.dumps({"gguf": gguf, **rows[-1]}), flush=True)
    eng.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH.gguf (repeat)")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per row (the first is a warm-up)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every model (1: on the shared 2-core machine two threads spin at ggml's "
                         "barriers while other jobs hold a core, 2.5x slower than one)")
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt", type=int, default=1 << 30,
                    help="longest prompt processed; longer contexts repeat its cache (no prompt speed reported)")
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's flash_attn_type (auto enables it on this CPU)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import llama_cpp

    results = {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "steps": args.steps,
               "flash_attn": args.flash_attn, "max_prompt": args.max_prompt,
               "models": {}}
    models = dict(spec.split("=", 1) for spec in args.model)
    for name, path in models.items():
        results["models"][name] = {"gguf": path, "file_bytes": Path(path).stat().st_size, "rows": []}
    for c in (int(x) for x in args.contexts.split(",")):  # the models one after another at each context
        for name, path in models.items():
            results["models"][name]["rows"] += measure(path, c, [int(b) for b in args.batches.split(",")],
                                                       args.steps, args.threads, args.n_batch, args.seed,
                                                       args.max_prompt, args.flash_attn)
    base = results["models"].get("original")
    if base:
        for m in results["models"].values():
            for row in m["rows"]:
                ref = next(r for r in base["rows"] if (r["context"], r["batch"]) == (row["context"], row["batch"]))
                row["kv_vs_original"] = row["kv_bytes_per_token"] / ref["kv_bytes_per_token"]
                row["decode_vs_original"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
                if row["prompt_tokens_per_s"] and ref["prompt_tokens_per_s"]:
                    row["prompt_vs_original"] = row["prompt_tokens_per_s"] / ref["prompt_tokens_per_s"]
    text = json.dumps(results, indent=2) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
