"""Held-out perplexity.

Two window modes, stated in every result:

* ``non-overlapping`` (default): the token stream is cut into consecutive windows of ``seq_len``; every
  token but the first of each window is scored with the context before it inside its window.
* ``sliding``: windows of ``seq_len`` advance by ``stride``; each window scores only its last ``stride``
  tokens (the first window scores all), so every scored token sees at least ``seq_len - stride`` tokens
  of context.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def geometric_mean(values: list[float]) -> float:
    """The geometric mean of perplexities (the perplexity with every domain's mean NLL weighted equally)."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def by_domain(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A mixture's perplexity result: every part's result under ``domains`` and their ``geometric_mean``."""
    first = next(iter(results.values()))
    return {"domains": results, "geometric_mean": geometric_mean([r["perplexity"] for r in results.values()]),
            **{k: first[k] for k in ("mode", "seq_len", "stride") if k in first}}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int = 512, stride: int | None = None,
               batch_size: int = 4, progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``model`` on a 1-D token stream; returns ppl, mean NLL, tokens scored and the mode."""
    from kvtool.errors import KvtoolError
    from kvtool.progress import progress_bar

    if tokens.numel() < 2:
        raise KvtoolError("need at least 2 held-out tokens for perplexity")
    seq_len = min(seq_len, tokens.numel())
    device = _model_device(model)
    spans: list[tuple[int, int, int]] = []  # (start, end, first scored position inside the window)
    if stride is None:
        for start in range(0, tokens.numel() - 1, seq_len):
            end = min(start + seq_len, tokens.numel())
            if end - start >= 2:
                spans.append((start, end, 1))
        mode = "non-overlapping"
    else:
        if not 0 < stride <= seq_len:
            raise KvtoolError(f"stride {stride} must be in 1..seq-len ({seq_len})")
        start, scored_until = 0, 1
        while scored_until < tokens.numel():
            end = min(start + seq_len, tokens.numel())
            spans.append((start, end, max(1, scored_until - start)))
            scored_until = end
            start += stride
        mode = "sliding"
    total_nll, total_tokens = 0.0, 0
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for s in spans:
        by_len.setdefault(s[1] - s[0], []).append(s)
    with progress_bar(progress) as bar:
        task = bar.add_task("perplexity", total=len(spans))
        for group in by_len.values():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                ids = torch.stack([tokens[a:b] for a, b, _ in chunk]).to(device)
                logits = model(input_ids=ids, use_cache=False).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # nll[:, t] scores token t+1
                for row, (_, _, first) in enumerate(chunk):
                    scored = nll[row, first - 1:]
                    total_nll += scored.double().sum().item()
                    total_tokens += scored.numel()
                bar.advance(task, len(chunk))
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens_scored": total_tokens, "mode": mode,
            "seq_len": seq_len, "stride": stride, "tokens": int(tokens.numel())}
