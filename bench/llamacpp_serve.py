"""llama.cpp serving on the CPU: the original GGUF vs kvtool's MLA exports (needs llama-cpp-python; `make
engines-setup` builds it).

For each GGUF and context C: the KV cache bytes per token as llama.cpp allocates them (its own log line
``llama_kv_cache: size = ... MiB (cells, layers, seqs), K (f16): ..., V (f16): ...``, divided by its cells), the
prompt tokens/s of one sequence of C - steps random tokens (one llama_decode per n_batch tokens), and the decode
tokens/s at batch B (B sequences of that context each, their own cache streams: ``kv_unified = false``, the prompt's
cache copied to the other streams with ``llama_memory_seq_cp``, then ``steps`` decode calls of one token per
sequence). Random token ids, seeded; same threads for every model.

    python bench/llamacpp_serve.py --model original=out/orig-f16/model.gguf --model mla-0.5=out/ds05-gguf/model.gguf \\
        --contexts 2048,8192,32768 --batches 1,4 --json docs/results/llamacpp_serve_cpu_2026-12-04.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\)")


@contextlib.contextmanager
def captured_stderr():
    """Everything written to file descriptor 2 (llama.cpp's log) inside the block, as a list with one string."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


class Engine:
    """One llama.cpp context over a GGUF: n_seq sequences of n_ctx_seq tokens each."""

    def __init__(self, gguf: str, n_ctx_seq: int, n_seq: int, threads: int, n_batch: int):
        import llama_cpp as L

        self.L = L
        with captured_stderr() as log:
            L.llama_log_set(None, ctypes.c_void_p())  # llama.cpp's default logger: stderr
            mp = L.llama_model_default_params()
            self.model = L.llama_model_load_from_file(gguf.encode(), mp)
            cp = L.llama_context_default_params()
            cp.n_ctx = n_ctx_seq * n_seq
            cp.n_batch = n_batch
            cp.n_ubatch = min(512, n_batch)
            cp.n_seq_max = n_seq
            cp.kv_unified = False
            cp.n_threads = cp.n_threads_batch = threads
            self.ctx = L.llama_init_from_model(self.model, cp)
        self.log = log[0]
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {gguf}:\n{self.log[-2000:]}")
        m = KV_LINE.search(self.log)
        if m is None:
            raise RuntimeError(f"no llama_kv_cache size line in llama.cpp's log:\n{self.log[-2000:]}")
        mib, cells, layers, seqs = float(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(5))
        self.kv_bytes_per_token = mib * 2**20 / (cells * seqs)
        self.kv_layers = layers
        self.flash_attn = "flash_attn" in self.log and bool(re.search(r"flash_attn\s*=\s*(1|enabled|true)", self.log))
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


def measure(gguf: str, context: int, batches: list[int], steps: int, threads: int, n_batch: int,
            seed: int) -> list[dict]:
    """Rows (one per batch size) for one GGUF at one context; the prompt is processed once per engine."""
    rows = []
    rng = np.random.default_rng(seed)
    for batch in batches:
        eng = Engine(gguf, context, batch, threads, n_batch)
        prompt = rng.integers(100, eng.vocab - 100, size=context - steps).tolist()
        t0 = time.perf_counter()
        for s in range(0, len(prompt), n_batch):
            eng.decode(prompt[s:s + n_batch], s, [0])
        prompt_s = time.perf_counter() - t0
        mem = eng.L.llama_get_memory(eng.ctx)
        for seq in range(1, batch):
            eng.L.llama_memory_seq_cp(mem, 0, seq, -1, -1)
        seqs = list(range(batch))
        eng.decode([int(rng.integers(100, 1000))] * batch, len(prompt), seqs)  # warm-up step (and the stream copy)
        t0 = time.perf_counter()
        for k in range(1, steps):
            eng.decode([int(rng.integers(100, 1000))] * batch, len(prompt) + k, seqs)
        step_s = (time.perf_counter() - t0) / (steps - 1)
        rows.append({"context": context, "batch": batch, "kv_bytes_per_token": eng.kv_bytes_per_token,
                     "kv_layers": eng.kv_layers, "prompt_tokens": len(prompt),
                     "prompt_tokens_per_s": len(prompt) / prompt_s, "decode_ms_per_step": 1000 * step_s,
                     "decode_tokens_per_s": batch / step_s, "flash_attn": eng.flash_attn})
        eng.close()
        print(json.dumps({"gguf": gguf, **rows[-1]}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH.gguf (repeat)")
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per row (the first is a warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import llama_cpp

    results = {"llama_cpp_python": llama_cpp.__version__, "threads": args.threads, "steps": args.steps,
               "models": {}}
    for spec in args.model:
        name, path = spec.split("=", 1)
        rows = []
        for c in (int(x) for x in args.contexts.split(",")):
            rows += measure(path, c, [int(b) for b in args.batches.split(",")], args.steps, args.threads,
                            args.n_batch, args.seed)
        results["models"][name] = {"gguf": path, "file_bytes": Path(path).stat().st_size, "rows": rows}
    base = results["models"].get("original")
    if base:
        for m in results["models"].values():
            for row in m["rows"]:
                ref = next(r for r in base["rows"] if (r["context"], r["batch"]) == (row["context"], row["batch"]))
                row["kv_vs_original"] = row["kv_bytes_per_token"] / ref["kv_bytes_per_token"]
                row["decode_vs_original"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
                row["prompt_vs_original"] = row["prompt_tokens_per_s"] / ref["prompt_tokens_per_s"]
    text = json.dumps(results, indent=2) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
