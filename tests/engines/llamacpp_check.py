"""llama.cpp (through llama-cpp-python) against stock transformers on the same token ids: the numbers `make
test-engines` checks, and GGUF files compared tensor by tensor."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

KV_TYPES = {"f16": 1, "f32": 0}  # GGML_TYPE_F16, GGML_TYPE_F32: llama.cpp's KV cache (f16 by default)


def llama_cpp_logits(gguf: Path, ids: list[int], n_ctx: int, kv_type: str = "f16") -> np.ndarray:
    """Logits [len(ids), vocab] of llama.cpp on ``ids`` in one sequence (float32)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, logits_all=True, verbose=False, seed=0, n_threads=2,
                type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def llama_cpp_greedy(gguf: Path, prompt: list[int], n_new: int, kv_type: str = "f16") -> list[int]:
    """Greedy continuation (argmax of each step's logits, no sampler) of ``prompt`` by llama.cpp."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + n_new + 8, n_batch=512, logits_all=True, verbose=False,
                seed=0, n_threads=2, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
    llm.eval(prompt)
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    llm.close()
    return out


def agreement(model_dir: Path, gguf: Path, ids: torch.Tensor, window: int = 512, n_new: int = 32,
              kv_type: str = "f16") -> dict[str, Any]:
    """llama.cpp vs transformers (float32) on held-out ``ids`` in windows of ``window`` tokens: relative log-prob
    error ‖lp_cpp − lp_hf‖/‖lp_hf‖ (log-softmax over the vocabulary, every position), argmax agreement, both
    perplexities and their relative difference; then greedy generation of ``n_new`` tokens from the first 32 ids.
    ``kv_type``: llama.cpp's KV cache type (its default f16, or f32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n_win = ids.numel() // window
    num = den = 0.0
    agree = total = 0
    nll_hf = nll_cpp = 0.0
    for w in range(n_win):
        chunk = ids[w * window:(w + 1) * window]
        with torch.no_grad():
            hf = model(chunk[None]).logits[0].double()
        cpp = torch.from_numpy(llama_cpp_logits(gguf, chunk.tolist(), window + 8, kv_type)).double()
        lp_hf, lp_cpp = hf.log_softmax(-1), cpp.log_softmax(-1)
        num += float((lp_cpp - lp_hf).pow(2).sum())
        den += float(lp_hf.pow(2).sum())
        agree += int((hf.argmax(-1) == cpp.argmax(-1)).sum())
        total += window
        nxt = chunk[1:]
        nll_hf -= float(lp_hf[:-1].gather(1, nxt[:, None]).sum())
        nll_cpp -= float(lp_cpp[:-1].gather(1, nxt[:, None]).sum())
    n_pred = n_win * (window - 1)
    ppl_hf, ppl_cpp = math.exp(nll_hf / n_pred), math.exp(nll_cpp / n_pred)
    prompt = ids[:32]
    with torch.no_grad():
        gen = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, 32, dtype=torch.long),
                             do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0)
    hf_tokens = gen[0, 32:].tolist()
    cpp_tokens = llama_cpp_greedy(gguf, prompt.tolist(), n_new, kv_type)
    first_diff = next((i for i, (a, b) in enumerate(zip(hf_tokens, cpp_tokens, strict=True)) if a != b), None)
    return {"tokens": total, "rel_logprob_err": math.sqrt(num / den), "argmax_agreement": agree / total,
            "ppl_transformers": ppl_hf, "ppl_llama_cpp": ppl_cpp, "ppl_rel_diff": abs(ppl_cpp / ppl_hf - 1),
            "greedy_identical": hf_tokens == cpp_tokens, "greedy_first_difference": first_diff,
            "greedy_tokens": n_new, "kv_type": kv_type}


def gguf_contents(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], np.ndarray]]]:
    """(metadata by key, tensors by name -> (type, shape, raw bytes as uint8))."""
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        fields[k] = v
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.array(t.data).view(np.uint8))
               for t in r.tensors}
    return fields, tensors


def compare_gguf(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor by tensor (name, type, shape, bytes) and key by key (outside ``general.*``, which names the file)."""
    f1, t1 = gguf_contents(ours)
    f2, t2 = gguf_contents(theirs)
    keys = {k for k in set(f1) | set(f2) if not k.startswith("general.")}
    key_diff = sorted(k for k in keys if _norm(f1.get(k)) != _norm(f2.get(k)))
    names = set(t1) | set(t2)
    tensor_diff = sorted(n for n in names if n not in t1 or n not in t2 or t1[n][:2] != t2[n][:2]
                         or not np.array_equal(t1[n][2], t2[n][2]))
    return {"tensors": len(names), "tensor_differences": tensor_diff, "key_differences": key_diff,
            "only_ours": sorted(set(f1) - set(f2)), "only_theirs": sorted(set(f2) - set(f1))}


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v
