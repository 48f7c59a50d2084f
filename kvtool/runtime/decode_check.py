"""Cached decode equals the full forward: the check every converted model must pass where users run it.

A model that caches wrongly (a layer that never reads or writes its cache, a cache argument it does not
recognize) still scores fine on perplexity, which runs full forwards; only generation goes wrong. This check runs
the model as ``generate`` does: prefill a prompt with a cache, then one token per step, and compares every step's
logits with the full uncached forward over the same tokens; then greedy ``generate`` from the prompt must give, at
every position, the argmax of the full forward over the generated sequence.

For a cache that changes what attention reads (``Int2Cache``), ``reference`` runs the full forward through that
cache's own emulation (a context manager around the reference forwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from kvtool.runtime.hf_cache import cache_kwarg, output_cache

TOLERANCE = 1e-4  # relative logit error per step, float32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@torch.no_grad()
def check_cached_decode(model: Any, ids: torch.Tensor, prefill: int, *, new_tokens: int = 16,
                        new_cache: Callable[[], Any] | None = None,
                        reference: Callable[[], contextlib.AbstractContextManager] | None = None,
                        tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Step-by-step cached logits vs the full forward on ``ids`` [B, L], and greedy ``generate`` vs argmax.

    ``new_cache()`` makes the cache object (None: the model's default, a DynamicCache); ``reference()`` a context
    in which the full forward emulates that cache. Returns the report; ``passed`` when every step is within
    ``tolerance`` (relative logit norm) and every greedy token is the full forward's argmax.
    """
    reference = reference or contextlib.nullcontext
    new_cache = new_cache or (lambda: None)
    name = cache_kwarg()
    b, length = ids.shape
    if not 0 < prefill < length:
        raise ValueError(f"prefill {prefill} must be inside the sequence (length {length})")
    with reference():
        full = model(input_ids=ids, use_cache=False).logits.float()
    out = model(input_ids=ids[:, :prefill], use_cache=True, **{name: new_cache()})
    cache, steps = output_cache(out), [out.logits[:, -1].float()]
    for t in range(prefill, length - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: cache})
        cache = output_cache(out)
        steps.append(out.logits[:, -1].float())
    cached = torch.stack(steps, 1)  # predictions for positions prefill .. length-1
    expected = full[:, prefill - 1:length - 1]
    step_err = [_rel(cached[:, i], expected[:, i]) for i in range(cached.shape[1])]

    prompt = ids[:, :prefill]
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=new_tokens, pad_token_id=0, **{name: new_cache()})
    with reference():
        full_gen = model(input_ids=generated, use_cache=False).logits.float()
    greedy = full_gen[:, prefill - 1:-1].argmax(-1)
    got = generated[:, prefill:]
    # a row that stopped at an end-of-sequence token is padded after it: compare up to and including that token
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=got.device)
    stopped = torch.isin(got, eos).long().cumsum(1)
    valid = (stopped == 0) | ((stopped == 1) & torch.isin(got, eos))
    agree = float((greedy == got)[valid].float().mean())
    return {"passed": bool(max(step_err) <= tolerance and agree == 1.0),
            "cached_vs_full_max_rel_err": max(step_err), "cached_steps": len(step_err),
            "generate_vs_full_argmax_agreement": agree, "generated_tokens": int(valid.sum()),
            "cached_decode_tolerance": tolerance, "batch": b}
